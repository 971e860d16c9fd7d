"""What users are told: notification texts, preferences, and the inbox queries."""
from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from shared.db import db, utcnow
from shared.errors import NotFound
from shared.models import Notification, NotificationPreferences
from shared.money import dollars

notifications_table = Notification.__table__
PREFERENCE_FIELDS = ("email_on_credit", "email_on_debit", "email_on_refund", "push_on_credit",
                     "push_on_debit", "push_on_refund", "min_amount_notify_cents")
DEFAULT_PREFERENCES = {"email_on_credit": True, "email_on_debit": True, "email_on_refund": True,
                       "push_on_credit": True, "push_on_debit": False, "push_on_refund": True,
                       "min_amount_notify_cents": 0}
# Which preference pair governs each notification type (None: always delivered).
PREFERENCE_KIND = {"credit_added": "credit", "credit_deducted": "debit",
                   "instant_refund": "refund", "balance_adjusted": None, "low_balance": None,
                   "suspicious_activity": None}


def for_credit(amount_cents: int, balance_cents: int) -> dict:
    """The "Credits Added" notification of a top-up."""
    return {"type": "credit_added", "title": "Credits Added",
            "message": f"{dollars(amount_cents)} added to your account. "
                       f"New balance: {dollars(balance_cents)}",
            "link": "/wallet", "icon": "add_circle", "amount_cents": amount_cents}


def for_purchase(cost_cents: int, balance_cents: int, service: str, verification_id: str) -> dict:
    """The "Credits Used" notification of a verification purchase."""
    return {"type": "credit_deducted", "title": "Credits Used",
            "message": f"{dollars(cost_cents)} deducted for {service} verification. "
                       f"New balance: {dollars(balance_cents)}",
            "link": f"/verify/{verification_id}", "icon": "credit_card",
            "amount_cents": cost_cents}


def for_refund(cost_cents: int, balance_cents: int, service: str, reason: str) -> dict:
    """The "Instant Refund Processed" notification of a refund."""
    return {"type": "instant_refund", "title": "Instant Refund Processed",
            "message": f"{dollars(cost_cents)} refunded for {service} ({reason}). "
                       f"New balance: {dollars(balance_cents)}",
            "link": "/wallet", "icon": "money_back", "amount_cents": cost_cents}


def for_adjustment(amount_cents: int, balance_cents: int, reason: str) -> dict:
    """The "Balance Adjusted" notification of a signed adjustment."""
    verb = "added to" if amount_cents > 0 else "deducted from"
    return {"type": "balance_adjusted", "title": "Balance Adjusted",
            "message": f"{dollars(abs(amount_cents))} {verb} your account ({reason}). "
                       f"New balance: {dollars(balance_cents)}",
            "link": "/wallet", "icon": "account_balance", "amount_cents": amount_cents}


def for_low_balance(balance_cents: int, threshold_cents: int) -> dict:
    """The warning sent when a debit takes the balance below the account's threshold."""
    return {"type": "low_balance", "title": "Low Balance",
            "message": f"Your balance is {dollars(balance_cents)}, below your "
                       f"{dollars(threshold_cents)} alert threshold. Top up to keep verifying.",
            "link": "/wallet", "icon": "warning", "amount_cents": balance_cents}


def serialize(n, deliveries=None) -> dict:
    """Notification as the contract's object; ``deliveries`` (rows of
    notification_deliveries) default to the ORM object's own. ``email_status`` is the email
    delivery's status."""
    out = [serialize_delivery(d) for d in (n.deliveries if deliveries is None else deliveries)]
    email = next((d["status"] for d in out if d["channel"] == "email"), "skipped")
    return {"id": n.id, "type": n.type, "title": n.title, "message": n.message, "link": n.link,
            "icon": n.icon, "transaction_id": n.transaction_id, "read": n.read,
            "created_at": n.created_at.isoformat(), "email_status": email, "deliveries": out}


def serialize_delivery(d) -> dict:
    """A notification_deliveries row as the contract's delivery object."""
    return {"channel": d.channel, "status": d.status, "attempts": d.attempts,
            "last_error": d.last_error, "updated_at": d.updated_at.isoformat()}


def list_for_user(*, user_id: str, unread_only: bool, limit: int,
                  before_id: int | None) -> tuple[int, list[Notification], int | None]:
    """(unread_count, page newest first, id to continue before or None)."""
    q = select(Notification).where(Notification.user_id == user_id)
    if unread_only:
        q = q.where(Notification.read.is_(False))
    if before_id is not None:
        q = q.where(Notification.id < before_id)
    rows = db.session.scalars(q.order_by(Notification.id.desc()).limit(limit + 1)).all()
    unread = db.session.scalar(select(func.count()).select_from(Notification).where(
        Notification.user_id == user_id, Notification.read.is_(False)))
    more = len(rows) > limit
    rows = rows[:limit]
    return unread, rows, (rows[-1].id if more and rows else None)


def mark_read(*, user_id: str, notification_id: int) -> Notification:
    """Mark one of the user's notifications read; NotFound if it is not theirs."""
    n = db.session.scalar(select(Notification).where(Notification.id == notification_id,
                                                     Notification.user_id == user_id))
    if n is None:
        raise NotFound("No such notification.")
    if not n.read:
        n.read = True
        db.session.commit()
    return n


def mark_all_read(*, user_id: str) -> int:
    """Mark every unread notification of the user read; returns how many changed."""
    result = db.session.execute(update(Notification).where(
        Notification.user_id == user_id, Notification.read.is_(False)).values(read=True))
    db.session.commit()
    return result.rowcount


def get_preferences(*, user_id: str) -> dict:
    """The user's delivery preferences, defaults where never set."""
    row = db.session.get(NotificationPreferences, user_id)
    if row is None:
        return dict(DEFAULT_PREFERENCES)
    return {f: getattr(row, f) for f in PREFERENCE_FIELDS}


def update_preferences(*, user_id: str, changes: dict) -> dict:
    """Apply the given fields to the user's preferences (others keep their value)."""
    for attempt in (1, 2):
        row = db.session.get(NotificationPreferences, user_id, with_for_update=True)
        if row is None:
            row = NotificationPreferences(user_id=user_id, **DEFAULT_PREFERENCES)
            db.session.add(row)
        for field, value in changes.items():
            setattr(row, field, value)
        row.updated_at = utcnow()
        try:
            db.session.commit()
        except IntegrityError:
            # A concurrent first write created the row; apply ours on top of it.
            db.session.rollback()
            if attempt == 2:
                raise
            continue
        return {f: getattr(row, f) for f in PREFERENCE_FIELDS}
    raise AssertionError("unreachable")
