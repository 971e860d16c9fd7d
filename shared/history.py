"""Reading the ledger: a user's history pages, CSV export, the admin monitor. All in SQL."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Iterator

from sqlalchemy import BigInteger, case, cast, func, select

from shared.db import db, utcnow
from shared.ledger import serialize_transaction
from shared.models import AccountTxCount, Transaction

t = Transaction.__table__
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
    (no scan); with one it is a count over the (user_id, created_at) index range only."""
    if start is None and end is None:
        q = select(func.coalesce(func.sum(counts.c.n), 0)).where(counts.c.user_id == user_id)
        if tx_type:
            q = q.where(counts.c.type == tx_type)
        return int(db.session.scalar(q))
    q = select(func.count()).select_from(t).where(t.c.user_id == user_id)
    if tx_type:
        q = q.where(t.c.type == tx_type)
    if start:
        q = q.where(t.c.created_at >= start)
    if end:
        q = q.where(t.c.created_at <= end)
    return int(db.session.scalar(q))


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


def _epoch_seconds(column):
    if db.session.get_bind().dialect.name == "sqlite":
        return cast(func.strftime("%s", column), BigInteger)
    return cast(func.floor(func.extract("epoch", column)), BigInteger)


def monitor(*, minutes: int, now: datetime | None = None) -> dict:
    """Admin summary of the last ``minutes``: one aggregate query, one group-by, 20 recent."""
    now = now or utcnow()
    cutoff = now - timedelta(minutes=minutes)
    t = Transaction
    in_window = t.created_at >= cutoff

    def total_of(tx_type: str, sign: int = 1):
        return func.coalesce(func.sum(case((t.type == tx_type, sign * t.amount_cents),
                                           else_=0)), 0)

    totals = db.session.execute(select(
        func.count(), total_of("credit"), total_of("sms_purchase", -1),
        total_of("verification_refund"), func.count(func.distinct(t.user_id)),
    ).where(in_window)).one()
    by_type = dict(db.session.execute(
        select(t.type, func.count()).where(in_window).group_by(t.type)).all())
    recent = db.session.execute(
        select(t.id, t.user_id, t.amount_cents, t.type, t.description, t.created_at)
        .where(in_window).order_by(t.created_at.desc(), t.id.desc()).limit(20)).all()
    width = bucket_minutes(minutes)
    bucket = _epoch_seconds(t.created_at) // (width * 60)
    sums = db.session.execute(
        select(bucket, func.count(), total_of("credit"), total_of("sms_purchase", -1),
               total_of("verification_refund")).where(in_window).group_by(bucket)).all()
    by_bucket = {int(b): row for b, *row in sums}
    first = int(cutoff.timestamp()) // (width * 60)
    last = max([int(now.timestamp()) // (width * 60), *by_bucket])
    series = []
    for b in range(first, last + 1):
        n, added, spent, refunds = by_bucket.get(b, (0, 0, 0, 0))
        series.append({"start": datetime.fromtimestamp(b * width * 60, timezone.utc).isoformat(),
                       "transactions": n, "credits_added_cents": int(added),
                       "credits_spent_cents": int(spent), "refunds_issued_cents": int(refunds)})
    return {"window_minutes": minutes, "bucket_minutes": width, "series": series,
            "total_transactions": totals[0],
            "credits_added_cents": int(totals[1]), "credits_spent_cents": int(totals[2]),
            "refunds_issued_cents": int(totals[3]), "unique_users": totals[4],
            "by_type": by_type,
            "recent_transactions": [{"id": r.id, "user_id": r.user_id,
                                     "amount_cents": r.amount_cents, "type": r.type,
                                     "description": r.description,
                                     "created_at": r.created_at.isoformat()} for r in recent]}
