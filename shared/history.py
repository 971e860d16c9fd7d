"""Reading the ledger: a user's history pages, CSV export, the admin monitor. All in SQL."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Iterator

from sqlalchemy import case, func, select

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


def export_rows(*, user_id: str, tx_type: str | None = None, start: datetime | None = None,
                end: datetime | None = None) -> Iterator[list]:
    """Every matching transaction, newest first, as CSV rows: keyset batches on seq, each its
    own short query, so no connection or transaction is held for the whole download."""
    before = None
    while True:
        q = _filtered(user_id, tx_type, start, end)
        if before is not None:
            q = q.where(t.c.seq < before)
        rows = db.session.execute(q.order_by(t.c.seq.desc()).limit(EXPORT_BATCH)).all()
        db.session.rollback()  # back to the pool between batches
        for row in rows:
            data = serialize_transaction(row)
            yield [_cell(data[c]) for c in CSV_COLUMNS]
        if len(rows) < EXPORT_BATCH:
            return
        before = rows[-1].seq


def monitor(*, minutes: int) -> dict:
    """Admin summary of the last ``minutes``: one aggregate query, one group-by, 20 recent."""
    cutoff = utcnow() - timedelta(minutes=minutes)
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
    return {"window_minutes": minutes, "total_transactions": totals[0],
            "credits_added_cents": int(totals[1]), "credits_spent_cents": int(totals[2]),
            "refunds_issued_cents": int(totals[3]), "unique_users": totals[4],
            "by_type": by_type,
            "recent_transactions": [{"id": r.id, "user_id": r.user_id,
                                     "amount_cents": r.amount_cents, "type": r.type,
                                     "description": r.description,
                                     "created_at": r.created_at.isoformat()} for r in recent]}
