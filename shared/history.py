"""Reading the ledger: a user's history pages, CSV export, the admin monitor. All in SQL."""
from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Iterator

from sqlalchemy import func, select, union

from shared import rollups
from shared.db import db, utcnow
from shared.ledger import serialize_transaction
from shared.models import AccountTxCount, Transaction

t = Transaction.__table__
_EPOCH, _HOUR = datetime(1970, 1, 1, tzinfo=timezone.utc), timedelta(hours=1)
_LAST_HOUR = (datetime.max.replace(tzinfo=timezone.utc) - _EPOCH) // _HOUR
counts = AccountTxCount.__table__
_COLUMNS = (t.c.id, t.c.seq, t.c.user_id, t.c.amount_cents, t.c.type, t.c.status,
            t.c.description, t.c.service, t.c.verification_id, t.c.reference,
            t.c.balance_after_cents, t.c.created_at)

CSV_COLUMNS = ("id", "seq", "created_at", "type", "amount_cents", "balance_after_cents",
               "status", "description", "service", "verification_id", "reference")


def _filtered(user_id: str, tx_type: str | None, start: datetime | None, end: datetime | None):
    q = select(*_COLUMNS).where(t.c.user_id == user_id)
    if tx_type:
        q = q.where(t.c.type == tx_type)
    if start:
        q = q.where(t.c.created_at >= start)
    if end:
        q = q.where(t.c.created_at <= end)
    return q


def _total(user_id: str, tx_type: str | None, start: datetime | None,
           end: datetime | None) -> int:
    """Exact count of the matching rows. Without a date filter it is the trigger-kept count
    (no scan). With one: whole hours from account_hour_counts, raw rows (the (user_id,
    created_at) index) for the two cut hours, and raw rows above the roll-up watermark, all
    in one snapshot, so a million-row account costs about what a small one does."""
    if start is None and end is None:
        q = select(func.coalesce(func.sum(counts.c.n), 0)).where(counts.c.user_id == user_id)
        if tx_type:
            q = q.where(counts.c.type == tx_type)
        return int(db.session.scalar(q))
    raw = select(func.count()).select_from(t).where(t.c.user_id == user_id)
    if tx_type:
        raw = raw.where(t.c.type == tx_type)
    with _snapshot() as conn:
        wm = rollups.watermark(conn)
        # Whole hours from first up to, not including, last; integer arithmetic, as a float
        # timestamp rounds 9999-12-31T23:59:59.999999 up into year 10000.
        first = -((_EPOCH - start) // _HOUR) if start else None
        last = (end - _EPOCH) // _HOUR if end else None
        if (not wm or (first is not None and last is not None and first >= last)
                or (first is not None and first > _LAST_HOUR)):  # no hour left to start
            return int(conn.scalar(_range(raw, start, end)))
        hours = rollups.hours_t
        whole = select(func.coalesce(func.sum(hours.c.n), 0)).where(hours.c.user_id == user_id)
        if tx_type:
            whole = whole.where(hours.c.type == tx_type)
        if first is not None:
            whole = whole.where(hours.c.hour >= first)
        if last is not None:
            whole = whole.where(hours.c.hour < last)
        total = int(conn.scalar(whole))
        rolled = raw.where(t.c.id <= wm)
        if start is not None:  # the cut hour at the start
            total += conn.scalar(_range(rolled, start, rollups.at(first * 3600), open_end=True))
        if end is not None:  # the cut hour at the end, end itself included
            total += conn.scalar(_range(rolled, rollups.at(last * 3600), end))
        return total + int(conn.scalar(_range(raw.where(t.c.id > wm), start, end)))


def _range(q, start: datetime | None, end: datetime | None, *, open_end: bool = False):
    if start is not None:
        q = q.where(t.c.created_at >= start)
    if end is not None:
        q = q.where(t.c.created_at < end if open_end else t.c.created_at <= end)
    return q


def page(*, user_id: str, tx_type: str | None = None, start: datetime | None = None,
         end: datetime | None = None, skip: int = 0, limit: int = 50,
         before_seq: int | None = None) -> tuple[int, list[dict], int | None]:
    """(total matching, page newest first, seq to continue before or None).

    ``before_seq`` is keyset paging on the account's seq, stable while new rows arrive.
    Unfiltered, ``skip`` becomes a seq bound when the account's seqs are gapless (their
    count equals the highest seq), so it reads ``limit`` index entries, not ``skip``.
    """
    total = _total(user_id, tx_type, start, end)
    q = _filtered(user_id, tx_type, start, end)
    if skip and not (tx_type or start or end):
        top = db.session.scalar(select(func.max(t.c.seq)).where(t.c.user_id == user_id)) or 0
        if top == total:
            before_seq = min(before_seq or top + 1, top + 1) - skip
            skip = 0
    if before_seq is not None:
        q = q.where(t.c.seq < before_seq)
    rows = db.session.execute(q.order_by(t.c.seq.desc()).offset(skip).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return total, [serialize_transaction(r) for r in rows], (rows[-1].seq if more else None)


EXPORT_BATCH = 2000
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value) -> str:
    """A CSV cell; text a spreadsheet would run as a formula is prefixed with a quote (numbers,
    a negative amount included, stay numbers)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return str(value)
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def export_batches(*, user_id: str, tx_type: str | None = None,
                   start: datetime | None = None,
                   end: datetime | None = None) -> Iterator[list[list[str]]]:
    """Every matching transaction, newest first, as batches of CSV rows: keyset batches on
    seq, each its own short query, so no connection or transaction is held for the whole
    download and memory stays at one batch."""
    before = None
    while True:
        q = _filtered(user_id, tx_type, start, end)
        if before is not None:
            q = q.where(t.c.seq < before)
        rows = db.session.execute(q.order_by(t.c.seq.desc()).limit(EXPORT_BATCH)).all()
        db.session.rollback()  # back to the pool between batches
        yield [[_cell(row._mapping[c]) if c != "created_at" else row.created_at.isoformat()
                for c in CSV_COLUMNS] for row in rows]
        if len(rows) < EXPORT_BATCH:
            return
        before = rows[-1].seq


def bucket_minutes(window_minutes: int) -> int:
    """The series' bucket width: minutes up to 3 h, quarter hours up to a day, then hours
    (at most 180, 96 and 168 points), aligned to UTC."""
    return 1 if window_minutes <= 180 else 15 if window_minutes <= 1440 else 60


@contextmanager
def _snapshot():
    """A connection whose statements all see one snapshot: the watermark, the roll-ups and
    the raw rows agree (PostgreSQL: REPEATABLE READ on its own connection; SQLite: the
    session's transaction, which holds the write lock, so nothing changes under it)."""
    if db.session.get_bind().dialect.name == "sqlite":
        yield db.session.connection()
        return
    with db.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        with conn.begin():
            yield conn


def _sums(rows, width: int, scale: int, acc: dict, by_type: dict) -> None:
    """Fold (bucket, type, count, amount) rows of ``scale``-minute buckets into the series'
    ``width``-minute buckets and the per-type totals."""
    for bucket, kind, n, amount in rows:
        b = acc.setdefault(int(bucket) * scale // width, [0, 0, 0, 0])
        amount = int(amount or 0)
        b[0] += n
        if kind == "credit":
            b[1] += amount
        elif kind == "sms_purchase":
            b[2] -= amount
        elif kind == "verification_refund":
            b[3] += amount
        by_type[kind] = by_type.get(kind, 0) + n


def monitor(*, minutes: int, now: datetime | None = None) -> dict:
    """Admin summary of the last ``minutes`` (every row with ``created_at >= now - minutes``).

    Whole minutes and whole series buckets (1, 15 or 60 minutes) come from the roll-ups
    (shared/rollups.py: every row with ``id <= watermark``); raw rows only for the minute the
    cutoff cuts and for ids above the watermark. So a week costs about what an hour costs, and
    the figures are exact for every committed row however it was written. Unique users: accounts
    whose latest rolled-up transaction is in the window, united with the accounts of the raw
    rows above the watermark (windows are open-ended, so "latest >= cutoff" is "active in the
    window")."""
    now = now or utcnow()
    cutoff = now - timedelta(minutes=minutes)
    width = bucket_minutes(minutes)
    cutoff_us = (cutoff - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    first_minute = -(-cutoff_us // 60_000_000)  # the first whole minute in the window
    first_wide = -(-first_minute // width)  # the first whole series bucket
    edge_end = rollups.at(first_minute * 60)
    acc: dict[int, list[int]] = {}
    by_type: dict[str, int] = {}
    with _snapshot() as conn:
        dialect = conn.dialect.name
        wm = rollups.watermark(conn)
        minute = rollups.epoch_seconds(t.c.created_at, dialect) // 60
        raw = select(minute, t.c.type, func.count(), func.sum(t.c.amount_cents))
        # ids above the watermark (a primary-key range), then the cut minute below it
        _sums(conn.execute(raw.where(t.c.id > wm, t.c.created_at >= cutoff)
                           .group_by(minute, t.c.type)).all(), width, 1, acc, by_type)
        _sums(conn.execute(raw.where(t.c.created_at >= cutoff, t.c.created_at < edge_end,
                                     t.c.id <= wm).group_by(minute, t.c.type)).all(),
              width, 1, acc, by_type)
        r = rollups.rollups
        part = select(r.c.bucket, r.c.type, r.c.n, r.c.amount_cents)  # noqa: E741
        # minutes up to the first whole series bucket, then buckets of the series' width
        if width > 1:
            _sums(conn.execute(part.where(r.c.grain_s == 60, r.c.bucket >= first_minute,
                                          r.c.bucket < first_wide * width)).all(),
                  width, 1, acc, by_type)
        _sums(conn.execute(part.where(r.c.grain_s == width * 60,
                                      r.c.bucket >= first_wide)).all(),
              width, width, acc, by_type)
        u = rollups.user_last
        users = union(select(u.c.user_id).where(u.c.last_at >= cutoff),
                      select(t.c.user_id).where(t.c.id > wm, t.c.created_at >= cutoff))
        unique_users = conn.scalar(select(func.count()).select_from(users.subquery()))
        recent = conn.execute(
            select(t.c.id, t.c.user_id, t.c.amount_cents, t.c.type, t.c.description,
                   t.c.created_at)
            .where(t.c.created_at >= cutoff)
            .order_by(t.c.created_at.desc(), t.c.id.desc()).limit(20)).all()
    first = int(cutoff.timestamp()) // (width * 60)
    last = max([int(now.timestamp()) // (width * 60), *acc])
    series = []
    totals = [0, 0, 0, 0]
    for b in range(first, last + 1):
        values = acc.get(b, (0, 0, 0, 0))
        totals = [x + y for x, y in zip(totals, values)]
        series.append({"start": datetime.fromtimestamp(b * width * 60, timezone.utc).isoformat(),
                       "transactions": values[0], "credits_added_cents": values[1],
                       "credits_spent_cents": values[2], "refunds_issued_cents": values[3]})
    return {"window_minutes": minutes, "bucket_minutes": width, "series": series,
            "total_transactions": totals[0],
            "credits_added_cents": totals[1], "credits_spent_cents": totals[2],
            "refunds_issued_cents": totals[3], "unique_users": int(unique_users),
            "by_type": {k: n for k, n in by_type.items() if n},
            "recent_transactions": [{"id": r.id, "user_id": r.user_id,
                                     "amount_cents": r.amount_cents, "type": r.type,
                                     "description": r.description,
                                     "created_at": r.created_at.isoformat()} for r in recent]}
