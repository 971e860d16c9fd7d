"""The admin monitor's roll-ups, filled by a periodic job (beat, every 30 s; ``run()`` also
works in-process): per-minute and per-hour counts and sums by type, and each account's latest
transaction time, for every transaction up to a watermark id.

Why by id and not by time: ids come from one sequence, so "every id above the watermark"
is a primary-key range that holds every row not rolled up yet, whatever its ``created_at``
(a row written by plain SQL with a back-dated time lands in its own, old bucket). Rows are
never counted twice: a range is added to the roll-ups in the same commit that moves the
watermark past it. Nothing runs on INSERT, so a purchase costs what it cost before.

Why the watermark waits (PostgreSQL): a transaction can hold an id below ids already
committed (it took the id first and commits later). Rolling up to the highest visible id
would skip such a row for good. So a new watermark goes through three runs:
1. ``pending_id`` = the highest id visible now;
2. a later run records ``pending_xmax`` = the next transaction id to be assigned (every
   transaction that held an id <= ``pending_id`` has a transaction id below it by then);
3. a later run takes it once the oldest transaction still running is at or past
   ``pending_xmax`` (``pg_snapshot_xmin``): every id <= ``pending_id`` is then committed or
   rolled back for good.
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

from sqlalchemy import BigInteger, cast, delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from shared.db import db, utcnow
from shared.models import (MonitorRollup, MonitorRollupDirty, MonitorRollupState,
                           MonitorUserLast, Transaction)

t = Transaction.__table__
rollups = MonitorRollup.__table__
user_last = MonitorUserLast.__table__
state_t = MonitorRollupState.__table__
dirty_t = MonitorRollupDirty.__table__

GRAINS = (60, 3600)
CHUNK_IDS = 100_000  # ids rolled up per commit (a backfill of millions goes in steps)
DIRTY_BATCH = 2000
LOCK_KEY = 0x74786D6F6E  # pg advisory lock: one job at a time ("txmon")


def epoch_seconds(column, dialect: str):
    if dialect == "sqlite":
        return cast(func.strftime("%s", column), BigInteger)
    return cast(func.floor(func.extract("epoch", column)), BigInteger)


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def _insert(dialect: str):
    return (postgresql if dialect == "postgresql" else sqlite).insert


def _state(conn) -> tuple[int, int | None, int | None]:
    row = conn.execute(select(state_t.c.watermark_id, state_t.c.pending_id,
                              state_t.c.pending_xmax).where(state_t.c.id == 1)).first()
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
    return sum(n for _, _, n, _ in rows)


def _recompute(conn, dialect: str, wm: int, marks) -> None:
    """Rebuild the marked minutes, their hours and the marked accounts from the raw rows
    with id <= wm (what the roll-ups hold by definition)."""
    buckets = {(60, m) for _, m, _ in marks} | {(3600, m * 60 // 3600) for _, m, _ in marks}
    for grain, bucket in sorted(buckets):
        conn.execute(delete(rollups).where(rollups.c.grain_s == grain,
                                           rollups.c.bucket == bucket))
        rows = conn.execute(
            select(t.c.type, func.count(), func.sum(t.c.amount_cents))
            .where(t.c.created_at >= at(bucket * grain), t.c.created_at < at((bucket + 1) * grain),
                   t.c.id <= wm).group_by(t.c.type)).all()
        if rows:
            conn.execute(rollups.insert(), [
                {"grain_s": grain, "bucket": bucket, "type": k, "n": n, "amount_cents": int(a)}
                for k, n, a in rows])
    for user in sorted({u for _, _, u in marks}):
        last = conn.scalar(select(func.max(t.c.created_at))
                           .where(t.c.user_id == user, t.c.id <= wm))
        conn.execute(delete(user_last).where(user_last.c.user_id == user))
        if last is not None:
            conn.execute(user_last.insert().values(user_id=user, last_at=last))
    conn.execute(delete(dirty_t).where(dirty_t.c.id.in_([i for i, _, _ in marks])))


def run(*, max_chunks: int = 10_000) -> dict:
    """One pass of the job: roll up to the safe watermark (in commits of CHUNK_IDS ids),
    recompute what UPDATE/DELETE marked, then prepare the next watermark. Safe to call from
    several processes at once (on PostgreSQL a second caller returns at once)."""
    engine = db.engine
    dialect = engine.dialect.name
    pg = dialect == "postgresql"
    rows = chunks = recomputed = 0
    with engine.connect() as conn:
        while chunks < max_chunks:
            with conn.begin():
                if not _locked(conn, pg):
                    return {"skipped": True}
                # Before this transaction writes anything (it has no transaction id of
                # its own yet, so the horizon is everyone else's).
                horizon = (conn.scalar(text(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"))
                    if pg else None)
                wm, pending, pending_xmax = _state(conn)
                if pg:
                    ready = (pending is not None and pending_xmax is not None
                             and horizon >= pending_xmax)
                    target = pending if ready else None
                else:
                    target = conn.scalar(select(func.max(t.c.id)))
                if target is None or target <= wm:
                    if pg and pending is not None and pending <= wm:
                        _set_state(conn, dialect, watermark_id=wm, pending_id=None,
                                   pending_xmax=None)
                    break
                hi = min(target, wm + CHUNK_IDS)
                rows += _add(conn, dialect, wm, hi)
                done = hi >= target
                _set_state(conn, dialect, watermark_id=hi,
                           pending_id=None if done else pending,
                           pending_xmax=None if done else pending_xmax)
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
        if pg:
            with conn.begin():
                if _locked(conn, pg):
                    wm, pending, pending_xmax = _state(conn)
                    if pending is not None and pending_xmax is None:
                        xmax = conn.scalar(text(
                            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"))
                        _set_state(conn, dialect, watermark_id=wm, pending_id=pending,
                                   pending_xmax=xmax)
                    elif pending is None:
                        top = conn.scalar(select(func.max(t.c.id))) or 0
                        if top > wm:
                            _set_state(conn, dialect, watermark_id=wm, pending_id=top,
                                       pending_xmax=None)
        with conn.begin():
            wm = watermark(conn)
    return {"rows": rows, "chunks": chunks, "recomputed": recomputed, "watermark_id": wm}


def catch_up(passes: int = 6) -> dict:
    """Run until every committed transaction is rolled up (tests, tools; with no other
    transaction open, three passes are enough on PostgreSQL, one on SQLite)."""
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
