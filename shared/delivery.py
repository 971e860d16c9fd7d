"""Delivering notifications: push to the user's realtime channel and email, per preferences."""
from __future__ import annotations

import logging

from sqlalchemy import select, update

from shared import mail, notifications, realtime
from shared.db import db
from shared.metrics import EMAILS, NOTIFICATIONS
from shared.models import Account, Notification, Transaction
from shared.money import dollars

log = logging.getLogger("txmon.delivery")


def wanted(channel: str, n: Notification, prefs: dict) -> bool:
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
