"""txmon.email: notification emails to users and alert emails to the admin."""
from __future__ import annotations

import logging

from flask import current_app
from sqlalchemy import select

from shared import alerts, delivery, mail, outbox
from shared.db import db
from shared.models import Alert, Notification
from worker_service.runner import handles
from worker_service.tasks import each
from worker_service.tasks.notifications import deliver_rows

log = logging.getLogger("txmon.email")


def give_up(failed, *, marked: bool = False) -> None:
    """Emails that failed for good: ``failed`` is (row, error); each is marked failed
    (unless ``marked``), a refund's is logged CRITICAL and raises an admin alert."""
    ids = [row.payload.get("notification_id") for row, _ in failed]
    ids = [i for i in ids if isinstance(i, int)]
    if not ids:
        return
    if not marked:
        delivery.mark_failed("email", notification_ids=ids)
    errors = {row.payload.get("notification_id"): exc for row, exc in failed}
    refunds = db.session.execute(select(Notification.id, Notification.user_id,
                                        Notification.transaction_id)
                                 .where(Notification.id.in_(ids),
                                        Notification.type == "instant_refund")).all()
    db.session.close()  # each alert is written on its own connection
    for nid, user_id, tx_id in refunds:
        error = errors.get(nid)
        error = error if isinstance(error, str) else type(error).__name__
        log.critical("CRITICAL: Failed to send refund notification: Notification=%s, "
                     "User=%s, Error=%s", nid, user_id, error)
        alerts.raise_alert(rule="refund_notification_failed", user_id=user_id,
                           transaction_id=tx_id,
                           details={"notification_id": nid, "error": error},
                           dedup_key=f"refund_notification_failed:{nid}")


@handles(outbox.SEND_EMAIL, on_dead=give_up)
def send_notification(rows) -> dict:
    """Email each notification once (one SMTP connection for the batch)."""
    results = deliver_rows("email", rows)
    refused = [(row, "SMTPRecipientsRefused") for row in rows if results.get(row.id) == "refused"]
    if refused:
        give_up(refused, marked=True)
    return results


def _send_alert(alert_id: int) -> str:
    alert = db.session.get(Alert, alert_id)
    if alert is None:
        return "gone"
    summary = alert.details.get("summary") or ", ".join(
        f"{k}={v}" for k, v in alert.details.items())
    mail.send(mail.build(to=current_app.config["TXMON_ADMIN_EMAIL"],
                         subject=f"txmon alert: {alert.rule} (user {alert.user_id})",
                         message_id=f"<alert-{alert_id}@txmon.local>",
                         context={"title": f"Alert: {alert.rule}",
                                  "message": f"User {alert.user_id}: {summary}",
                                  "amount": None, "balance": None,
                                  "wallet_url": current_app.config["TXMON_PUBLIC_URL"]}))
    return "sent"


@handles(outbox.EMAIL_ALERT)
def send_alert(rows) -> dict:
    """Email each alert to TXMON_ADMIN_EMAIL (paused with the notification emails)."""
    return delivery.SMTP_BREAKER.guard(
        rows, lambda rows: each(rows, "alert_id", _send_alert))
