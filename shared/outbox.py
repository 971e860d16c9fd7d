"""The outbox: rows naming worker tasks, written in the ledger's own commit.

A row is the promise that its task will run. The relay in worker_service dispatches rows
after commit and re-dispatches any left behind, so a crash or a Redis outage between the
commit and the enqueue loses nothing.
"""
from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import insert

from shared.models import OutboxMessage

DELIVER_PUSH = "txmon.notifications.deliver"
SEND_EMAIL = "txmon.email.send_notification"
CHECK_ALERTS = "txmon.alerts.check_transaction"
PUBLISH_BALANCE = "txmon.realtime.publish_balance"
EXPIRE_VERIFICATION = "txmon.refunds.expire_verification"
EMAIL_ALERT = "txmon.email.send_alert"
PUBLISH_ALERT = "txmon.realtime.publish_alert"

outbox_table = OutboxMessage.__table__
log = logging.getLogger("txmon.outbox")
MAX_ATTEMPTS = 10  # a row sent this often without completing is left for an operator


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


def claim_and_dispatch(send, *, limit: int = 500, lease_s: int | None = None,
                       only: tuple[str, ...] | None = None,
                       skip: tuple[str, ...] | None = None) -> int:
    """Send due, undispatched rows with ``send(task, kwargs, eta)`` and mark them dispatched.

    ``kwargs`` is the row's payload plus ``outbox_id``: the task marks the row completed
    when it has run (see worker_service/base.py). ``send`` returns True when it finished
    the work itself (the row is completed at once).

    With ``lease_s``, rows dispatched but not completed by ``lease_s`` after they were due
    (and after their last dispatch) are sent again: the broker can lose a message a worker
    had taken (a Redis outage while it was prefetched or waiting for its ETA); tasks are
    idempotent, so sending again is safe.

    ``only`` / ``skip`` restrict the pass to some task names (the relay runs balance
    updates on a loop of their own, so they never wait behind task dispatches).

    Rows are claimed with FOR UPDATE SKIP LOCKED on Postgres, so any number of relays can
    run at once without sending a row twice; on SQLite the write lock serializes relays.
    If ``send`` raises (Redis down), the transaction rolls back and the rows stay pending
    for the next pass. Returns how many rows were dispatched.
    """
    from datetime import timedelta

    from sqlalchemy import and_, or_, select, update

    from shared.db import db, utcnow

    o = outbox_table.c
    now = utcnow()
    wanted = o.dispatched_at.is_(None)
    if lease_s is not None:
        stale = now - timedelta(seconds=lease_s)
        wanted = or_(wanted, and_(o.completed_at.is_(None), o.available_at < stale,
                                  o.dispatched_at < stale, o.attempts < MAX_ATTEMPTS))
    if only:
        wanted = and_(wanted, o.task.in_(only))
    if skip:
        wanted = and_(wanted, o.task.not_in(skip))
    with db.engine.begin() as conn:
        q = (select(o.id, o.task, o.payload, o.available_at, o.attempts)
             .where(wanted).order_by(o.id).limit(limit))
        if conn.dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        rows = conn.execute(q).all()
        done = []
        for row in rows:
            if row.attempts:
                log.warning("Outbox row %s (%s) sent again: not completed in time",
                            row.id, row.task)
            eta = row.available_at if row.available_at > now else None
            if send(row.task, dict(row.payload, outbox_id=row.id), eta):
                done.append(row.id)
        if rows:
            conn.execute(update(outbox_table).where(o.id.in_([r.id for r in rows]))
                         .values(dispatched_at=now, attempts=o.attempts + 1))
        if done:
            conn.execute(update(outbox_table).where(o.id.in_(done)).values(completed_at=now))
    return len(rows)


def mark_completed(outbox_id: int) -> None:
    """Record that the task of an outbox row has run (successfully or for the last time)."""
    from sqlalchemy import update

    from shared.db import db, utcnow

    with db.engine.begin() as conn:
        conn.execute(update(outbox_table).where(outbox_table.c.id == outbox_id,
                                                outbox_table.c.completed_at.is_(None))
                     .values(completed_at=utcnow()))


def backlog() -> int:
    """How many outbox rows are due and not yet dispatched."""
    from sqlalchemy import func, select

    from shared.db import db, utcnow

    o = outbox_table.c
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(outbox_table)
                            .where(o.dispatched_at.is_(None),
                                   o.available_at <= utcnow())).scalar_one()
