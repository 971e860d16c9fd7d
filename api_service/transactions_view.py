"""The detailed transaction page shared by the wallet and the service API."""
from __future__ import annotations

from api_service.schemas import DetailedQuery
from shared import history


def detailed_page(user_id: str, query: DetailedQuery) -> dict:
    """``{total, transactions, next_cursor}`` for one account."""
    total, rows, next_seq = history.page(
        user_id=user_id, tx_type=query.type, start=query.start_date, end=query.end_date,
        skip=query.skip, limit=query.limit,
        before_seq=int(query.cursor) if query.cursor else None)
    return {"total": total, "transactions": rows,
            "next_cursor": str(next_seq) if next_seq is not None else None}
