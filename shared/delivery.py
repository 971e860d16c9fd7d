"""Delivering notifications: push to the user's realtime channel and email, per preferences."""
from __future__ import annotations

import logging

from sqlalchemy import bindparam, select, update

from shared import mail, notifications, realtime
from shared.db import RawSql, db, utcnow
from shared.metrics import EMAILS, NOTIFICATIONS
from shared.models import Account, Notification, NotificationPreferences, Transaction
from shared.money import dollars

log = logging.getLogger("txmon.delivery")


def wanted(channel: str, n, prefs: dict) -> bool:
    """Whether the user wants ``n`` on ``channel`` ("push" or "email")."""
    kind = notifications.PREFERENCE_KIND.get(n.type)
    if kind is not None and not prefs[f"{channel}_on_{kind}"]:
        return False
    if n.amount_cents is not None and n.type != "low_balance":
        return abs(n.amount_cents) >= prefs["min_amount_notify_cents"]
    return True


def push(*, notification_id: int) -> str:
    """Publish the notification on its owner's channel; returns "sent", "skipped" or "gone"."""
    n = db.session.get(Notification, notification_id)
    if n is None:
        return "gone"
    if not wanted("push", n, notifications.get_preferences(user_id=n.user_id)):
        return "skipped"
    realtime.publish(realtime.user_channel(n.user_id),
                     {"type": "notification", "notification": notifications.serialize(n)})
    NOTIFICATIONS.labels(type=n.type, success="true").inc()
    return "sent"


def email(*, notification_id: int) -> str:
    """Email the notification once; returns its final email_status (or "gone").

    The row is locked while sending so a redelivered task waits and then sees "sent".
    Raises on transient SMTP trouble (the caller retries).
    """
    n = db.session.scalar(select(Notification).where(Notification.id == notification_id)
                          .with_for_update())
    if n is None:
        db.session.rollback()
        return "gone"
    if n.email_status != "pending":
        db.session.rollback()
        return n.email_status
    account = db.session.get(Account, n.user_id)
    prefs = notifications.get_preferences(user_id=n.user_id)
    if account is None or not account.email or not wanted("email", n, prefs):
        return _set_email_status(n, "skipped")
    context = {"title": n.title, "message": n.message, "wallet_url": _wallet_url(),
               **_amounts(n, account)}
    mail.send(mail.build(to=account.email, subject=f"txmon: {n.title}", context=context))
    EMAILS.labels(result="sent").inc()
    NOTIFICATIONS.labels(type=n.type, success="true").inc()
    log.info("Email sent: Type=%s, User=%s", n.type, n.user_id)
    return _set_email_status(n, "sent")


def _amounts(n: Notification, account: Account) -> dict:
    """The email's "Amount" and "New balance" as of the notification, not of sending."""
    if n.type == "low_balance":  # amount_cents holds the balance that triggered it
        return {"amount": None, "balance": dollars(n.amount_cents)}
    balance = account.balance_cents
    if n.transaction_id is not None:
        tx = db.session.get(Transaction, n.transaction_id)
        balance = tx.balance_after_cents if tx else balance
    return {"amount": dollars(abs(n.amount_cents or 0)), "balance": dollars(balance)}


def mark_email_failed(*, notification_id: int) -> None:
    """Record that email delivery gave up (retries spent)."""
    db.session.rollback()
    db.session.execute(update(Notification).where(Notification.id == notification_id,
                                                   Notification.email_status == "pending")
                       .values(email_status="failed"))
    db.session.commit()
    EMAILS.labels(result="failed").inc()


def _set_email_status(n: Notification, status: str) -> str:
    n.email_status = status
    db.session.commit()
    if status == "skipped":
        EMAILS.labels(result="skipped").inc()
    return status


def _wallet_url() -> str:
    from flask import current_app

    return current_app.config["TXMON_PUBLIC_URL"].rstrip("/") + "/wallet"


# -- push and email in one run ---------------------------------------------------------------

_n, _a = Notification.__table__, Account.__table__
_p, _t = NotificationPreferences.__table__, Transaction.__table__
_DELIVERY_ROW = (
    select(*_n.c, _a.c.email.label("account_email"),
           _a.c.balance_cents.label("account_balance_cents"),
           _a.c.user_id.label("account_user_id"),
           _p.c.user_id.label("prefs_user_id"),
           *[_p.c[f].label(f"pref_{f}") for f in notifications.PREFERENCE_FIELDS],
           _t.c.balance_after_cents.label("tx_balance_after_cents"))
    .select_from(_n.outerjoin(_a, _a.c.user_id == _n.c.user_id)
                 .outerjoin(_p, _p.c.user_id == _n.c.user_id)
                 .outerjoin(_t, _t.c.id == _n.c.transaction_id))
    .where(_n.c.id == bindparam("notification_id")))
_DELIVERY_ROW_LOCKED = _DELIVERY_ROW.with_for_update(of=_n)
_SET_STATUS = "UPDATE notifications SET email_status = %s WHERE id = %s"
_COMPLETE = "UPDATE outbox SET completed_at = %s WHERE id = %s AND completed_at IS NULL"


class EmailFailed(Exception):
    """The email of ``deliver`` failed (``__cause__`` says why); the push, if wanted, was
    sent and the notification's email is still pending."""


def deliver(*, notification_id: int, outbox_id: int | None = None,
            push_failed: bool = False) -> dict:
    """Push and email one notification in one database transaction.

    One query loads the notification (locked, as ``email`` does), its account, preferences
    and transaction. While the email is pending, the push is published (if wanted), then the
    email sent (if wanted) and ``email_status`` set, and with ``outbox_id`` the outbox row
    marked completed, all in one commit. A notification whose email is already final was
    delivered before (the push comes first), so a redelivered run sends nothing again.

    ``push_failed``: the push could not be published and will not be retried; it is
    counted as failed and the email still goes.

    Returns {"push": ..., "email": ..., "completed": bool}. Raises EmailFailed (after
    rolling back: the email stays pending) when sending failed, and anything else as is.
    """
    with db.engine.connect() as conn:
        with conn.begin():
            q = _DELIVERY_ROW_LOCKED if conn.dialect.name == "postgresql" else _DELIVERY_ROW
            row = conn.execute(q, {"notification_id": notification_id}).first()
            if row is None:
                _complete(conn, outbox_id)
                return {"push": "gone", "email": "gone", "completed": outbox_id is not None}
            if row.email_status != "pending":
                _complete(conn, outbox_id)
                return {"push": "done", "email": row.email_status,
                        "completed": outbox_id is not None}
            prefs = (dict(notifications.DEFAULT_PREFERENCES) if row.prefs_user_id is None
                     else {f: row._mapping[f"pref_{f}"] for f in notifications.PREFERENCE_FIELDS})
            pushed = "skipped"
            if wanted("push", row, prefs):
                if push_failed:
                    NOTIFICATIONS.labels(type=row.type, success="false").inc()
                    pushed = "failed"
                else:
                    realtime.publish(realtime.user_channel(row.user_id),
                                     {"type": "notification",
                                      "notification": notifications.serialize(row)})
                    NOTIFICATIONS.labels(type=row.type, success="true").inc()
                    pushed = "sent"
            status = "skipped"
            if row.account_user_id is not None and row.account_email and wanted("email", row,
                                                                                 prefs):
                status = "sent"
            # The row stays locked while sending, as in ``email``: a concurrent run waits,
            # then finds the status final.
            if status == "sent":
                try:
                    mail.send(mail.build(to=row.account_email, subject=f"txmon: {row.title}",
                                         context=_row_context(row)))
                except Exception as exc:  # rolled back on the way out: still pending
                    raise EmailFailed(pushed) from exc
            sql = RawSql(conn)
            with sql.pipeline():  # one round trip for both (Postgres)
                sql.execute(_SET_STATUS, (status, notification_id))
                if outbox_id is not None:
                    sql.execute(_COMPLETE, (utcnow(), outbox_id))
    if status == "sent":
        EMAILS.labels(result="sent").inc()
        NOTIFICATIONS.labels(type=row.type, success="true").inc()
        log.info("Email sent: Type=%s, User=%s", row.type, row.user_id)
    else:
        EMAILS.labels(result="skipped").inc()
    return {"push": pushed, "email": status, "completed": outbox_id is not None}


def _complete(conn, outbox_id: int | None) -> None:
    if outbox_id is not None:
        RawSql(conn).execute(_COMPLETE, (utcnow(), outbox_id))


def _row_context(row) -> dict:
    """The email's template context from a ``_DELIVERY_ROW`` (see ``_amounts``)."""
    if row.type == "low_balance":
        amounts = {"amount": None, "balance": dollars(row.amount_cents)}
    else:
        balance = row.account_balance_cents
        if row.transaction_id is not None and row.tx_balance_after_cents is not None:
            balance = row.tx_balance_after_cents
        amounts = {"amount": dollars(abs(row.amount_cents or 0)), "balance": dollars(balance)}
    return {"title": row.title, "message": row.message, "wallet_url": _wallet_url(), **amounts}
