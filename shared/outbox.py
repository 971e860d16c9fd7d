"""The outbox: rows naming worker tasks, written in the ledger's own commit.

A row is the promise that its task will run. The relay in worker_service dispatches rows
after commit and re-dispatches any left behind, so a crash or a Redis outage between the
commit and the enqueue loses nothing.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import insert

from shared.models import OutboxMessage

DELIVER_PUSH = "txmon.notifications.deliver"
SEND_EMAIL = "txmon.email.send_notification"
CHECK_ALERTS = "txmon.alerts.check_transaction"
PUBLISH_BALANCE = "txmon.realtime.publish_balance"
EXPIRE_VERIFICATION = "txmon.refunds.expire_verification"

outbox_table = OutboxMessage.__table__


def message(task: str, user_id: str | None, now: datetime, *, available_at: datetime | None = None,
            **payload) -> dict:
    """One outbox row for ``task`` with ``payload`` (ids only: tasks reload what they need)."""
    return {"task": task, "user_id": user_id, "payload": payload,
            "available_at": available_at or now, "created_at": now, "attempts": 0}


def notification_messages(notification_id: int, user_id: str, now: datetime) -> list[dict]:
    """The delivery work every notification needs: push to the user, then email."""
    return [message(DELIVER_PUSH, user_id, now, notification_id=notification_id),
            message(SEND_EMAIL, user_id, now, notification_id=notification_id)]


def write(conn, rows: list[dict]) -> None:
    """Insert outbox rows on ``conn`` (inside the caller's transaction)."""
    if rows:
        conn.execute(insert(outbox_table), rows)
