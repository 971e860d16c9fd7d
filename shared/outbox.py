"""The outbox: every follow-up of a commit, as a row written in that commit, and every
statement on the outbox table.

A row names a handler and carries ids. Its life: written (due at ``available_at``) ->
dispatched by the relay when due -> started by a runner, which holds a lease and extends
it while it works -> completed (deleted TXMON_OUTBOX_KEEP_DAYS later); or, when a run
fails, due again after the handler's backoff, and dead (``dead_at``) once its attempts are
spent, until an operator re-drives it. A row dispatched but not started within
``DISPATCH_LEASE_S`` (its message lost with the broker's queues) or whose lease ran out (its
worker died) is dispatched again.

``HANDLERS`` declares each handler once, with its queue and retry schedule: the relay
asks it where a row goes, the worker's batch runner what to run.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, func, or_, select, update

from shared.db import RawSql, db, utcnow
from shared.models import BALANCE_TASK, OutboxMessage

log = logging.getLogger("txmon.outbox")
outbox_table = OutboxMessage.__table__
o = outbox_table.c

# Postgres plans the outbox's statements from the table as it is at each run. psycopg
# prepares a statement after a few runs and Postgres then keeps one generic plan, costed
# with the size of that moment; the outbox is a queue, empty one minute and tens of thousands
# of rows the next, and a claim kept a sequential scan of it (5.6 ms a claim at 200
# purchases/s against 0.15 ms, pg_stat_statements). Every statement on it has an index to
# use, and statistics lag the queue even per run, so plain index scans only, in index order:
# a batch's lease by id scanned the table or an index of due times (2.7-3.3 ms a batch),
# and a claim of 500 out of 10,000 rows come due read and sorted them all (20 ms). Per
# transaction, so the ledger's statements on the same connections keep their plans.
PLAN_EVERY_RUN = ("SELECT set_config('plan_cache_mode', 'force_custom_plan', true),"
                  " set_config('enable_seqscan', 'off', true),"
                  " set_config('enable_bitmapscan', 'off', true)")


@contextmanager
def _begin(engine=None):
    """A transaction for statements on the outbox (see PLAN_EVERY_RUN)."""
    with (engine or db.engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(PLAN_EVERY_RUN)
        yield conn


RUN_LEASE_S = 30  # a runner extends it every third of this while it works
DISPATCH_LEASE_S = 30  # dispatched and not started this long: the message was lost
BATCH_MAX = 100  # rows per runner task


@dataclass(frozen=True)
class Handler:
    """One kind of follow-up: its task name, Celery queue and retry schedule."""

    name: str
    queue: str
    backoff_s: tuple[int, ...] = (1, 5, 15, 60, 300)
    attempts: int = 6

    def delay_after(self, attempts: int) -> int:
        """Seconds before the next run, after ``attempts`` failed runs."""
        return self.backoff_s[min(attempts, len(self.backoff_s)) - 1]


HANDLERS: dict[str, Handler] = {}


def _declare(name: str, queue: str, **schedule) -> str:
    HANDLERS[name] = Handler(name, queue, **schedule)
    return name


PUSH = _declare("txmon.notifications.push", "push", backoff_s=(1, 2, 5, 15, 60), attempts=6)
SEND_EMAIL = _declare("txmon.email.send_notification", "email",
                      backoff_s=(2, 10, 30, 60, 300, 900), attempts=8)
CHECK_ALERTS = _declare("txmon.alerts.check_transaction", "alerts")
PUBLISH_BALANCE = _declare(BALANCE_TASK, "realtime")
EXPIRE_VERIFICATION = _declare("txmon.refunds.expire_verification", "refunds",
                               backoff_s=(1, 5, 15, 60, 300), attempts=10)
EMAIL_ALERT = _declare("txmon.email.send_alert", "email", backoff_s=(2, 10, 30, 60, 300, 900),
                       attempts=8)
PUBLISH_ALERT = _declare("txmon.realtime.publish_alert", "realtime")
# Notification channels, each with its handler (queue and retry schedule): a notification
# gets one delivery row and one outbox row per channel.
CHANNELS = {"push": PUSH, "email": SEND_EMAIL}
QUEUES = tuple(dict.fromkeys(h.queue for h in HANDLERS.values()))


def handler(task: str) -> Handler | None:
    """The declaration of ``task`` (None for a name no release declares)."""
    return HANDLERS.get(task)


# -- write (inside the ledger's transaction) ------------------------------------------------

def message(task: str, user_id: str | None, now: datetime, *, available_at: datetime | None = None,
            **payload) -> dict:
    """One outbox row for ``task`` with ``payload`` (ids only: handlers reload what they need),
    due at ``available_at`` (default now)."""
    return {"task": task, "user_id": user_id, "payload": payload,
            "available_at": available_at or now, "created_at": now, "attempts": 0}


def notification_messages(notification_id: int, user_id: str, now: datetime) -> list[dict]:
    """The delivery work of a notification: one row per channel."""
    return [message(task, user_id, now, notification_id=notification_id)
            for task in CHANNELS.values()]


_INSERT = "INSERT INTO outbox (user_id, task, payload, available_at, created_at, attempts) VALUES "
_ROW = "(%s, %s, %s, %s, %s, %s)"


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


# -- claim (the relay) ------------------------------------------------------------------------

_COLUMNS = (o.id, o.task, o.payload, o.attempts)
_LAPSED = and_(o.completed_at.is_(None), o.dead_at.is_(None), o.dispatched_at.is_not(None),
               o.dispatched_at < bindparam("stale"), o.available_at <= bindparam("now"),
               or_(o.leased_until.is_(None), o.leased_until < bindparam("now")))


def _claim(dialect: str, limit: int, lapsed: bool, only: tuple, skip: tuple):
    wanted = _LAPSED if lapsed else and_(o.dispatched_at.is_(None),
                                         o.available_at <= bindparam("now"))
    if only:
        wanted = and_(wanted, o.task.in_(only))
    if skip:
        wanted = and_(wanted, o.task.not_in(skip))
    claim = select(*_COLUMNS).where(wanted).order_by(o.available_at, o.id).limit(limit)
    return claim.with_for_update(skip_locked=True) if dialect == "postgresql" else claim


_claims: dict[tuple, object] = {}  # Core statements built once per shape (CPU per pass)
_MARK_DISPATCHED = (update(outbox_table).where(o.id.in_(bindparam("ids", expanding=True)))
                    .values(dispatched_at=bindparam("now")))


def claim_and_dispatch(dispatch, *, limit: int = 500, lapsed: bool = False,
                       only: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> int:
    """Claim due, undispatched rows (``lapsed``: rows whose message or runner was lost),
    hand them to ``dispatch(rows)`` and mark them dispatched, in one transaction.

    Rows are locked with SKIP LOCKED on Postgres, so any number of relays run at once; on
    SQLite the write lock serializes them. If ``dispatch`` raises (broker down) the claim
    rolls back and the rows wait for the next pass. Returns how many were claimed.
    """
    now = utcnow()
    with _begin() as conn:
        key = (conn.dialect.name, limit, lapsed, tuple(only), tuple(skip))
        if key not in _claims:
            _claims[key] = _claim(*key)
        rows = conn.execute(_claims[key], {"now": now,
                                           "stale": now - timedelta(seconds=DISPATCH_LEASE_S)}
                            ).all()
        if not rows:
            return 0
        if lapsed:
            log.warning("Outbox rows sent again (message or worker lost): %s",
                        ", ".join(f"{r.id} ({r.task})" for r in rows[:20]))
        unknown = [r.id for r in rows if r.task not in HANDLERS]
        dispatch([r for r in rows if r.task in HANDLERS])
        conn.execute(_MARK_DISPATCHED, {"now": now, "ids": [r.id for r in rows]})
        if unknown:  # nothing could ever run them: dead at once, for an operator to see
            conn.execute(update(outbox_table).where(o.id.in_(unknown))
                         .values(dead_at=now, last_error="no handler declared for this task"))
    return len(rows)


# The balance loop's claim on Postgres (it runs once per commit of the whole platform): one
# statement claims and completes the waiting balance updates, returning the message the
# ledger stored; the caller publishes them inside the same transaction.
CLAIM_BALANCES = (
    "UPDATE outbox SET dispatched_at = %s, completed_at = %s, attempts = attempts + 1"
    " WHERE id IN (SELECT id FROM outbox WHERE dispatched_at IS NULL AND available_at <= %s"
    " AND task = %s ORDER BY available_at, id LIMIT %s FOR UPDATE SKIP LOCKED)"
    " RETURNING id, user_id, (payload -> 'message')::text")


def claim_balances(sql: RawSql, limit: int) -> list[tuple]:
    """Claim and complete waiting balance updates on ``sql`` (Postgres); see CLAIM_BALANCES."""
    now = utcnow()
    sql.execute(PLAN_EVERY_RUN)
    return sql.execute(CLAIM_BALANCES, (now, now, now, PUBLISH_BALANCE, limit)).fetchall()


# -- run (the worker's batch runner) ----------------------------------------------------------

_START = (update(outbox_table)
          .where(o.id.in_(bindparam("ids", expanding=True)), o.completed_at.is_(None),
                 o.dead_at.is_(None), o.available_at <= bindparam("now"),
                 or_(o.leased_until.is_(None), o.leased_until < bindparam("now")))
          .values(leased_until=bindparam("until"), attempts=o.attempts + 1)
          .returning(o.id, o.payload, o.attempts))
_EXTEND = (update(outbox_table)
           .where(o.id.in_(bindparam("ids", expanding=True)), o.completed_at.is_(None))
           .values(leased_until=bindparam("until")))
_COMPLETE = (update(outbox_table)
             .where(o.id.in_(bindparam("ids", expanding=True)), o.completed_at.is_(None))
             .values(completed_at=bindparam("now"), leased_until=None))


def start(ids: list[int]) -> list:
    """Lease the rows of ``ids`` still to do and not held by another runner; returns them
    (id, payload, attempts counting this run), in one statement."""
    if not ids:
        return []
    now = utcnow()
    with _begin() as conn:
        rows = conn.execute(_START, {"ids": ids, "now": now,
                                     "until": now + timedelta(seconds=RUN_LEASE_S)}).all()
    return sorted(rows, key=lambda r: r.id)


def extend(engine, ids: list[int]) -> None:
    """Extend the lease of rows a runner is still working on."""
    if ids:
        with _begin(engine) as conn:
            conn.execute(_EXTEND, {"ids": ids,
                                   "until": utcnow() + timedelta(seconds=RUN_LEASE_S)})


def complete(ids: list[int]) -> None:
    """Mark rows done, in one statement."""
    if ids:
        with _begin() as conn:
            conn.execute(_COMPLETE, {"ids": ids, "now": utcnow()})


class Postpone:
    """A handler's result for a row it did not try (its channel is paused): due again in
    ``seconds``, the attempt not counted."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __repr__(self) -> str:
        return "postponed"


def postpone(rows: list, seconds: float) -> None:
    """Rows a runner leased and did not try: due again in ``seconds``, attempt not counted."""
    if rows:
        with _begin() as conn:
            conn.execute(update(outbox_table)
                         .where(o.id.in_([r.id for r in rows]), o.completed_at.is_(None))
                         .values(dispatched_at=None, leased_until=None,
                                 attempts=o.attempts - 1,
                                 available_at=utcnow() + timedelta(seconds=seconds)))


def fail(task: str, failures: list[tuple]) -> list[int]:
    """Record failed runs: ``failures`` are (row, error text). Each row is due again after
    its handler's backoff, or dead when its attempts are spent. Returns the dead rows' ids."""
    spec = HANDLERS[task]
    now = utcnow()
    dead = []
    with _begin() as conn:
        for row, error in failures:
            values = {"last_error": error[:2000], "leased_until": None}
            if row.attempts >= spec.attempts:
                values["dead_at"] = now
                dead.append(row.id)
            else:
                values.update(dispatched_at=None,
                              available_at=now + timedelta(seconds=spec.delay_after(row.attempts)))
            conn.execute(update(outbox_table).where(o.id == row.id, o.completed_at.is_(None))
                         .values(**values))
    for row_id in dead:
        log.error("Outbox row %s (%s) dead after %s attempts", row_id, task, spec.attempts)
    return dead


PURGE_BATCH = 5000  # completed rows deleted per transaction


def purge_completed(before: datetime, *, limit: int = PURGE_BATCH) -> int:
    """Delete up to ``limit`` rows completed before ``before``, the earliest completed first
    (ix_outbox_completed); returns how many. Rows not done (waiting, in flight, dead
    letters) are never deleted."""
    with _begin() as conn:
        return conn.execute(
            outbox_table.delete().where(o.id.in_(
                select(o.id).where(o.completed_at < before).order_by(o.completed_at)
                .limit(limit).scalar_subquery()))).rowcount


# -- operators --------------------------------------------------------------------------------

def stats() -> dict:
    """What is not done yet: due rows waiting for dispatch (``backlog``), the age of the oldest
    of them, rows dispatched and not completed (``in_flight``), dead rows, and per task.
    One aggregate per state, each on its own index (ix_outbox_due, ix_outbox_in_flight,
    ix_outbox_dead): completed rows, nearly all of the table, are never read."""
    now = utcnow()
    states = {
        "backlog": and_(o.dispatched_at.is_(None), o.available_at <= now,
                        o.completed_at.is_(None), o.dead_at.is_(None)),
        "in_flight": and_(o.completed_at.is_(None), o.dispatched_at.is_not(None),
                          o.dead_at.is_(None)),
        "dead": o.dead_at.is_not(None),
    }
    by_task: dict[str, dict[str, int]] = {}
    oldest = None
    with _begin() as conn:
        for state, where in states.items():
            rows = conn.execute(select(o.task, func.count().label("n"),
                                       func.min(o.available_at).label("oldest"))
                                .where(where).group_by(o.task)).all()
            for r in rows:
                counts = by_task.setdefault(r.task, {"backlog": 0, "in_flight": 0, "dead": 0})
                counts[state] = r.n
                if state == "backlog" and (oldest is None or r.oldest < oldest):
                    oldest = r.oldest
    return {"backlog": sum(t["backlog"] for t in by_task.values()),
            "oldest_due_age_s": round(max(0.0, (now - oldest).total_seconds()), 3)
            if oldest is not None else 0.0,
            "in_flight": sum(t["in_flight"] for t in by_task.values()),
            "dead": sum(t["dead"] for t in by_task.values()), "by_task": by_task}


def backlog() -> int:
    """How many outbox rows are due and not yet dispatched."""
    with _begin() as conn:
        return conn.execute(select(func.count()).select_from(outbox_table)
                            .where(o.dispatched_at.is_(None),
                                   o.available_at <= utcnow())).scalar_one()


def serialize(row) -> dict:
    """An outbox row as the admin API shows it."""
    return {"id": row.id, "task": row.task, "user_id": row.user_id, "payload": row.payload,
            "attempts": row.attempts, "available_at": _iso(row.available_at),
            "created_at": _iso(row.created_at), "dispatched_at": _iso(row.dispatched_at),
            "completed_at": _iso(row.completed_at), "dead_at": _iso(row.dead_at),
            "last_error": row.last_error}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def dead_rows(*, limit: int = 50) -> list:
    """The most recent dead letters (ix_outbox_dead), newest first."""
    with _begin() as conn:
        return conn.execute(select(outbox_table).where(o.dead_at.is_not(None))
                            .order_by(o.dead_at.desc(), o.id.desc()).limit(limit)).all()


def retry_dead(*, outbox_id: int):
    """Re-drive a dead row: due now, with a fresh set of attempts. Returns the row; raises
    NotFound, or InvalidState when the row is not dead."""
    from shared.errors import InvalidState, NotFound

    now = utcnow()
    with _begin() as conn:
        row = conn.execute(
            update(outbox_table).where(o.id == outbox_id, o.dead_at.is_not(None))
            .values(dead_at=None, dispatched_at=None, leased_until=None, attempts=0,
                    available_at=now)
            .returning(*outbox_table.c)).first()
        if row is None:
            found = conn.execute(select(o.id).where(o.id == outbox_id)).first()
            if found is None:
                raise NotFound(f"No outbox row {outbox_id}.")
            raise InvalidState(f"Outbox row {outbox_id} is not dead.")
    log.info("Outbox row %s (%s) re-driven by an operator", row.id, row.task)
    return row
