"""The outbox: rows naming worker tasks, written in the ledger's own commit.

A row is the promise that its task will run. The relay in worker_service dispatches rows
after commit and re-dispatches any left behind, so a crash or a Redis outage between the
commit and the enqueue loses nothing.
"""
from __future__ import annotations

import json
import logging
from functools import lru_cache
from datetime import datetime

from shared.db import RawSql
from shared.models import OutboxMessage

DELIVER = "txmon.notifications.deliver_all"  # push and email of one notification
DELIVER_PUSH = "txmon.notifications.deliver"  # push only: rows written before DELIVER
SEND_EMAIL = "txmon.email.send_notification"  # email only: idem, and DELIVER's email retries
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
    """The delivery work every notification needs: push to the user, then email (one row,
    one task: see worker_service/tasks/notifications.py ``deliver_all``)."""
    return [message(DELIVER, user_id, now, notification_id=notification_id)]


def write(conn, rows: list[dict]) -> None:
    """Insert outbox rows in one statement on ``conn`` (inside the caller's transaction).

    ``conn`` is a SQLAlchemy Connection or, on the ledger's hot path, a shared.db.RawSql.
    """
    if not rows:
        return
    sql = conn if isinstance(conn, RawSql) else RawSql(conn)
    params = []
    for r in rows:
        params += (r["user_id"], r["task"], json.dumps(r["payload"]), r["available_at"],
                   r["created_at"], r["attempts"])
    sql.execute(_INSERT + ", ".join([_ROW] * len(rows)), params)


_INSERT = "INSERT INTO outbox (user_id, task, payload, available_at, created_at, attempts) VALUES "
_ROW = "(%s, %s, %s, %s, %s, %s)"


def claim_and_dispatch(send, *, limit: int = 500, lease_s: int | None = None,
                       only: tuple[str, ...] | None = None,
                       skip: tuple[str, ...] | None = None) -> int:
    """Send due, undispatched rows with ``send(task, kwargs, eta)`` and mark them dispatched.

    ``kwargs`` is the row's payload plus ``outbox_id``: the task marks the row completed
    when it has run (see worker_service/base.py). ``send`` returns True when it finished
    the work itself (the row is completed at once). If ``send`` has a ``flush()`` method,
    it is called after the last row, inside the claim's transaction (a sender that groups
    rows sends its groups there; if that raises, the claim rolls back like any send).

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

    from shared.db import db, utcnow

    now = utcnow()
    params = {"now": now}
    if lease_s is not None:
        params["stale"] = now - timedelta(seconds=lease_s)
    with db.engine.begin() as conn:
        claim, mark = _claim_statements(conn.dialect.name, limit, lease_s is not None,
                                        tuple(only or ()), tuple(skip or ()))
        rows = conn.execute(claim, params).all()
        done = []
        for row in rows:
            if row.attempts:
                log.warning("Outbox row %s (%s) sent again: not completed in time",
                            row.id, row.task)
            eta = row.available_at if row.available_at > now else None
            if send(row.task, dict(row.payload, outbox_id=row.id), eta):
                done.append(row.id)
        flush = getattr(send, "flush", None)
        if flush is not None:
            flush()
        if rows:  # dispatched, and completed already when ``send`` did the work itself
            conn.execute(mark, {"now": now, "ids": [r.id for r in rows], "done": done})
    return len(rows)


@lru_cache(maxsize=32)
def _claim_statements(dialect: str, limit: int, leased: bool, only: tuple, skip: tuple):
    """The claim's SELECT and UPDATE for one shape of pass, built once (building Core
    statements on every pass cost the relay more CPU than running them)."""
    from sqlalchemy import and_, bindparam, case, or_, select, update

    o = outbox_table.c
    wanted = o.dispatched_at.is_(None)
    if leased:
        stale = bindparam("stale")
        wanted = or_(wanted, and_(o.completed_at.is_(None), o.available_at < stale,
                                  o.dispatched_at < stale, o.attempts < MAX_ATTEMPTS))
    if only:
        wanted = and_(wanted, o.task.in_(only))
    if skip:
        wanted = and_(wanted, o.task.not_in(skip))
    claim = (select(o.id, o.task, o.payload, o.available_at, o.attempts)
             .where(wanted).order_by(o.id).limit(limit))
    if dialect == "postgresql":
        claim = claim.with_for_update(skip_locked=True)
    now = bindparam("now")
    mark = (update(outbox_table).where(o.id.in_(bindparam("ids", expanding=True)))
            .values(dispatched_at=now, attempts=o.attempts + 1,
                    completed_at=case((o.id.in_(bindparam("done", expanding=True)), now),
                                      else_=o.completed_at)))
    return claim, mark


def mark_completed(outbox_id: int) -> None:
    """Record that the task of an outbox row has run (successfully or for the last time)."""
    from sqlalchemy import update

    from shared.db import db, utcnow

    with db.engine.begin() as conn:
        conn.execute(update(outbox_table).where(outbox_table.c.id == outbox_id,
                                                outbox_table.c.completed_at.is_(None))
                     .values(completed_at=utcnow()))


def mark_completed_many(conn, outbox_ids: list[int]) -> None:
    """``mark_completed`` for many rows, on ``conn`` (inside the caller's transaction)."""
    from sqlalchemy import update

    from shared.db import utcnow

    if outbox_ids:
        conn.execute(update(outbox_table).where(outbox_table.c.id.in_(outbox_ids),
                                                outbox_table.c.completed_at.is_(None))
                     .values(completed_at=utcnow()))


def open_ids(outbox_ids: list[int]) -> set[int]:
    """Those of ``outbox_ids`` whose rows exist and are not completed."""
    from sqlalchemy import select

    from shared.db import db

    if not outbox_ids:
        return set()
    with db.engine.connect() as conn:
        return set(conn.execute(select(outbox_table.c.id).where(
            outbox_table.c.id.in_(outbox_ids), outbox_table.c.completed_at.is_(None))).scalars())


def backlog() -> int:
    """How many outbox rows are due and not yet dispatched."""
    from sqlalchemy import func, select

    from shared.db import db, utcnow

    o = outbox_table.c
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(outbox_table)
                            .where(o.dispatched_at.is_(None),
                                   o.available_at <= utcnow())).scalar_one()
