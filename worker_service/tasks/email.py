"""txmon.email: notification emails to users and alert emails to the admin."""
from __future__ import annotations

import logging

from shared import alerts, delivery, mail
from shared.db import db
from shared.models import Alert, Notification
from worker_service.base import PERMANENT, TRANSIENT
from worker_service.celery_app import celery

log = logging.getLogger("txmon.email")


@celery.task(name="txmon.email.send_notification", bind=True)
def send_notification(self, notification_id: int) -> str:
    """Email a notification once; after the last retry mark it failed (and alert on refunds)."""
    try:
        return delivery.email(notification_id=notification_id)
    except PERMANENT as exc:  # e.g. the recipient is refused: retrying cannot help
        return give_up(notification_id, exc)
    except TRANSIENT as exc:
        if not self.retries_exhausted:
            raise
        return give_up(notification_id, exc)


def give_up(notification_id: int, exc: Exception) -> str:
    """Mark the email failed; a refund's failure is CRITICAL and raises an admin alert."""
    delivery.mark_email_failed(notification_id=notification_id)
    n = db.session.get(Notification, notification_id)
    if n is not None and n.type == "instant_refund":
        user_id, tx_id = n.user_id, n.transaction_id
        db.session.close()  # the alert is written on its own connection
        log.critical("CRITICAL: Failed to send refund notification: Notification=%s, "
                     "User=%s, Error=%s", notification_id, user_id, type(exc).__name__)
        alerts.raise_alert(rule="refund_notification_failed", user_id=user_id,
                           transaction_id=tx_id,
                           details={"notification_id": notification_id,
                                    "error": type(exc).__name__},
                           dedup_key=f"refund_notification_failed:{notification_id}")
    return "failed"


@celery.task(name="txmon.email.send_alert")
def send_alert(alert_id: int) -> str:
    """Email an alert to TXMON_ADMIN_EMAIL."""
    alert = db.session.get(Alert, alert_id)
    if alert is None:
        return "gone"
    from flask import current_app

    summary = alert.details.get("summary") or ", ".join(
        f"{k}={v}" for k, v in alert.details.items())
    msg = mail.build(to=current_app.config["TXMON_ADMIN_EMAIL"],
                     subject=f"txmon alert: {alert.rule} (user {alert.user_id})",
                     context={"title": f"Alert: {alert.rule}",
                              "message": f"User {alert.user_id}: {summary}",
                              "amount": None, "balance": None,
                              "wallet_url": current_app.config["TXMON_PUBLIC_URL"]})
    mail.send(msg)
    return "sent"
