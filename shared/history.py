"""Reading the ledger: a user's history pages, CSV export, the admin monitor. All in SQL."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Iterator

from sqlalchemy import case, func, select

from shared.db import db, utcnow
from shared.ledger import serialize_transaction
from shared.models import Transaction

CSV_COLUMNS = ("id", "seq", "created_at", "type", "amount_cents", "balance_after_cents",
               "status", "description", "service", "verification_id", "reference")


def _filtered(user_id: str, tx_type: str | None, start: datetime | None, end: datetime | None):
    q = select(Transaction).where(Transaction.user_id == user_id)
    if tx_type:
        q = q.where(Transaction.type == tx_type)
    if start:
        q = q.where(Transaction.created_at >= start)
    if end:
        q = q.where(Transaction.created_at <= end)
    return q


def page(*, user_id: str, tx_type: str | None = None, start: datetime | None = None,
         end: datetime | None = None, skip: int = 0, limit: int = 50,
         before_seq: int | None = None) -> tuple[int, list[dict], int | None]:
    """(total matching, page newest first, seq to continue before or None).

    ``before_seq`` is keyset paging on the account's seq, stable while new rows arrive.
    """
    q = _filtered(user_id, tx_type, start, end)
    total = db.session.scalar(select(func.count()).select_from(q.subquery()))
    if before_seq is not None:
        q = q.where(Transaction.seq < before_seq)
    rows = db.session.scalars(q.order_by(Transaction.seq.desc()).offset(skip)
                              .limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return total, [serialize_transaction(r) for r in rows], (rows[-1].seq if more else None)


def export_rows(*, user_id: str, tx_type: str | None = None, start: datetime | None = None,
                end: datetime | None = None) -> Iterator[list]:
    """Every matching transaction, newest first, as CSV rows (streamed from the cursor)."""
    q = _filtered(user_id, tx_type, start, end).order_by(Transaction.seq.desc())
    for tx in db.session.scalars(q.execution_options(yield_per=500)):
        data = serialize_transaction(tx)
        yield [data[c] if data[c] is not None else "" for c in CSV_COLUMNS]


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
