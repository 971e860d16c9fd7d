"""The admin monitor's roll-ups, filled by a periodic job (beat, every 30 s; ``run()`` also
works in-process): per-minute, quarter-hour and hour counts and sums by type, each account's
latest transaction time and its count per type and hour (date-filtered history totals), for
every transaction up to a watermark id.

Why by id and not by time: ids come from one sequence, so "every id above the watermark"
is a primary-key range that holds every row not rolled up yet, whatever its ``created_at``
(a row written by plain SQL with a back-dated time lands in its own, old bucket). Rows are
never counted twice: a range is added to the roll-ups in the same commit that moves the
watermark past it. Nothing runs on INSERT, so a purchase costs what it cost before.

Why the watermark waits (PostgreSQL): a transaction can hold an id below ids already
committed (it drew the id first and commits later). Rolling up to the highest visible id
would skip such a row for good. An INSERT takes its RowExclusiveLock on ``transactions``
before it draws an id from the sequence, and keeps it to its end. So the job reads the
highest visible id (``pending_id``), then, in a later statement, the transactions holding a
write lock on ``transactions`` in this database (``pending_writers``, their virtual
transaction ids from ``pg_locks``, which any role may read): every uncommitted id at or below
``pending_id`` belongs to one of them. The watermark moves to ``pending_id`` once none of them
is alive any more: at once when none was (a quiet moment), else at a later run (30 s). Only
writers of this table are waited for, not every transaction of the server (autovacuum,
other databases). A writer that stays open (a session idle in a transaction) holds the
watermark back; the monitor stays exact, reading more raw rows, until it ends.
On SQLite a writer holds the database's write lock, and this job takes it too (BEGIN
IMMEDIATE), so every id up to the highest one it sees is committed: the watermark moves in
one run.

UPDATE and DELETE of transactions (txmon never does either; plain SQL might) leave a mark in
``monitor_rollup_dirty`` by trigger; the job recomputes those minutes, hours and accounts
from the raw rows.

The monitor (shared/history.py) reads the roll-ups for whole buckets and raw rows for the
cut edge of its window and for every id above the watermark, in one snapshot, so its
figures are exact for every committed row.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, cast, delete, func, select, text
from sqlalchemy.dialects import postgresql, sqlite

from shared.db import db, utcnow
from shared.models import (AccountHourCount, MonitorRollup, MonitorRollupDirty,
                           MonitorRollupState, MonitorUserLast, Transaction)

t = Transaction.__table__
rollups = MonitorRollup.__table__
user_last = MonitorUserLast.__table__
hours_t = AccountHourCount.__table__
state_t = MonitorRollupState.__table__
dirty_t = MonitorRollupDirty.__table__

GRAINS = (60, 900, 3600)  # the monitor series' bucket widths (history.bucket_minutes)
CHUNK_IDS = 100_000  # ids rolled up per commit (a backfill of millions goes in steps)
DIRTY_BATCH = 2000
LOCK_KEY = 0x74786D6F6E  # pg advisory lock: one job at a time ("txmon")


def epoch_seconds(column, dialect: str):
    if dialect == "sqlite":  # whole seconds of the text: strftime rounds to milliseconds
        return cast(func.strftime("%s", func.substr(column, 1, 19)), BigInteger)
    return cast(func.floor(func.extract("epoch", column)), BigInteger)


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def _insert(dialect: str):
    return (postgresql if dialect == "postgresql" else sqlite).insert


def _state(conn) -> tuple[int, int | None, int | None]:
    row = conn.execute(select(state_t.c.watermark_id, state_t.c.pending_id,
                              state_t.c.pending_writers).where(state_t.c.id == 1)).first()
    return tuple(row) if row else (0, None, None)


def _set_state(conn, dialect: str, **values) -> None:
    values["updated_at"] = utcnow()
    ins = _insert(dialect)(state_t).values(id=1, watermark_id=values.pop("watermark_id", 0),
                                           **values)
    conn.execute(ins.on_conflict_do_update(
        index_elements=[state_t.c.id],
        set_={k: ins.excluded[k] for k in ("watermark_id", *values)}))


def watermark(conn) -> int:
    return _state(conn)[0]


def _locked(conn, pg: bool) -> bool:
    return not pg or bool(conn.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"),
                                      {"k": LOCK_KEY}))


def _add(conn, dialect: str, lo: int, hi: int) -> int:
    """Add transactions lo < id <= hi to the roll-ups; the number of rows read."""
    minute = epoch_seconds(t.c.created_at, dialect) // 60
    rows = conn.execute(select(minute, t.c.type, func.count(), func.sum(t.c.amount_cents))
                        .where(t.c.id > lo, t.c.id <= hi).group_by(minute, t.c.type)).all()
    sums: dict[tuple, list[int]] = {}
    for m, kind, n, amount in rows:
        for grain in GRAINS:
            s = sums.setdefault((grain, int(m) * 60 // grain, kind), [0, 0])
            s[0] += n
            s[1] += int(amount)
    if sums:
        ins = _insert(dialect)(rollups)
        conn.execute(ins.on_conflict_do_update(
            index_elements=[rollups.c.grain_s, rollups.c.bucket, rollups.c.type],
            set_={"n": rollups.c.n + ins.excluded.n,
                  "amount_cents": rollups.c.amount_cents + ins.excluded.amount_cents}),
            [{"grain_s": g, "bucket": b, "type": k, "n": n, "amount_cents": a}
             for (g, b, k), (n, a) in sums.items()])
    users = conn.execute(select(t.c.user_id, func.max(t.c.created_at))
                         .where(t.c.id > lo, t.c.id <= hi).group_by(t.c.user_id)).all()
    if users:
        ins = _insert(dialect)(user_last)
        later = func.greatest if dialect == "postgresql" else func.max
        conn.execute(ins.on_conflict_do_update(
            index_elements=[user_last.c.user_id],
            set_={"last_at": later(user_last.c.last_at, ins.excluded.last_at)}),
            [{"user_id": u, "last_at": last} for u, last in users])
    _add_hours(conn, dialect, (t.c.id > lo) & (t.c.id <= hi))
    return sum(n for _, _, n, _ in rows)


def _add_hours(conn, dialect: str, where) -> None:
    """Add the rows matching ``where`` to account_hour_counts."""
    hour = epoch_seconds(t.c.created_at, dialect) // 3600
    counts = conn.execute(select(t.c.user_id, t.c.type, hour, func.count())
                          .where(where).group_by(t.c.user_id, t.c.type, hour)).all()
    if counts:
        ins = _insert(dialect)(hours_t)
        conn.execute(ins.on_conflict_do_update(
            index_elements=[hours_t.c.user_id, hours_t.c.type, hours_t.c.hour],
            set_={"n": hours_t.c.n + ins.excluded.n}),
            [{"user_id": u, "type": k, "hour": int(h), "n": n} for u, k, h, n in counts])


def _recompute(conn, dialect: str, wm: int, marks) -> None:
    """Rebuild the marked minutes, their hours and the marked accounts from the raw rows
    with id <= wm (what the roll-ups hold by definition)."""
    buckets = {(grain, m * 60 // grain) for _, m, _ in marks for grain in GRAINS}
    for grain, bucket in sorted(buckets):
        conn.execute(delete(rollups).where(rollups.c.grain_s == grain,
                                           rollups.c.bucket == bucket))
        rows = conn.execute(
            select(t.c.type, func.count(), func.sum(t.c.amount_cents))
            .where(t.c.created_at >= at(bucket * grain),
                   t.c.created_at < at((bucket + 1) * grain), t.c.id <= wm)
            .group_by(t.c.type)).all()
        if rows:
            conn.execute(rollups.insert(), [
                {"grain_s": grain, "bucket": bucket, "type": k, "n": n, "amount_cents": int(a)}
                for k, n, a in rows])
    for user, hour in sorted({(u, m * 60 // 3600) for _, m, u in marks}):
        conn.execute(delete(hours_t).where(hours_t.c.user_id == user, hours_t.c.hour == hour))
        _add_hours(conn, dialect, (t.c.user_id == user) & (t.c.id <= wm)
                   & (t.c.created_at >= at(hour * 3600))
                   & (t.c.created_at < at((hour + 1) * 3600)))
    for user in sorted({u for _, _, u in marks}):
        last = conn.scalar(select(func.max(t.c.created_at))
                           .where(t.c.user_id == user, t.c.id <= wm))
        conn.execute(delete(user_last).where(user_last.c.user_id == user))
        if last is not None:
            conn.execute(user_last.insert().values(user_id=user, last_at=last))
    conn.execute(delete(dirty_t).where(dirty_t.c.id.in_([i for i, _, _ in marks])))


WRITERS = text("""
    SELECT coalesce(string_agg(DISTINCT virtualtransaction, ','), '') FROM pg_locks
    WHERE locktype = 'relation' AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND relation = 'transactions'::regclass
      AND mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock',
                   'AccessExclusiveLock')
      AND pid IS DISTINCT FROM pg_backend_pid()""")
ALIVE = text("SELECT count(*) FROM pg_locks"
             " WHERE virtualtransaction = ANY(string_to_array(:v, ','))")


def _safe_target(conn, pg: bool, wm: int, pending: int | None,
                 writers: str | None) -> int | None:
    """The id the watermark may move to now, or None."""
    if not pg:
        return conn.scalar(select(func.max(t.c.id)))
    if pending is None or pending <= wm:
        return None
    if writers and conn.scalar(ALIVE, {"v": writers}):
        return None
    return pending


def run(*, max_chunks: int = 10_000) -> dict:
    """One pass of the job: note the next watermark (PostgreSQL), roll up to the safe one
    (in commits of CHUNK_IDS ids), then recompute what UPDATE/DELETE marked. Safe to call
    from several processes at once (on PostgreSQL a second caller returns at once)."""
    engine = db.engine
    dialect = engine.dialect.name
    pg = dialect == "postgresql"
    rows = chunks = recomputed = 0
    with engine.connect() as conn:
        if pg:
            with conn.begin():
                if not _locked(conn, pg):
                    return {"skipped": True}
                wm, pending, writers = _state(conn)
                if pending is None or pending <= wm:
                    top = conn.scalar(select(func.max(t.c.id))) or 0
                    if top > wm:  # the writers are read after the id: see the docstring
                        _set_state(conn, dialect, watermark_id=wm, pending_id=top,
                                   pending_writers=conn.scalar(WRITERS))
        while chunks < max_chunks:
            with conn.begin():
                if not _locked(conn, pg):
                    return {"skipped": True}
                wm, pending, writers = _state(conn)
                target = _safe_target(conn, pg, wm, pending, writers)
                if target is None or target <= wm:
                    break
                hi = min(target, wm + CHUNK_IDS)
                rows += _add(conn, dialect, wm, hi)
                done = hi >= target
                _set_state(conn, dialect, watermark_id=hi,
                           pending_id=None if done else pending,
                           pending_writers=None if done else writers)
                chunks += 1
        while True:
            with conn.begin():
                if not _locked(conn, pg):
                    break
                marks = conn.execute(select(dirty_t.c.id, dirty_t.c.minute, dirty_t.c.user_id)
                                     .order_by(dirty_t.c.id).limit(DIRTY_BATCH)).all()
                if marks:
                    _recompute(conn, dialect, watermark(conn), marks)
                    recomputed += len(marks)
            if len(marks) < DIRTY_BATCH:
                break
        with conn.begin():
            wm, pending, writers = _state(conn)
    return {"rows": rows, "chunks": chunks, "recomputed": recomputed, "watermark_id": wm,
            "waiting_for": writers or None}


def catch_up(passes: int = 6) -> dict:
    """Run until every committed transaction is rolled up (tests, tools; with no writer of
    transactions open, one pass is enough)."""
    result = {}
    for _ in range(passes):
        result = run()
        with db.engine.connect() as conn:
            top = conn.scalar(select(func.max(t.c.id))) or 0
            marks = conn.scalar(select(func.count()).select_from(dirty_t))
            conn.rollback()
        if result.get("watermark_id", 0) >= top and not marks:
            break
    return result
