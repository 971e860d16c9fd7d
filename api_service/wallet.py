"""A user's wallet: balance, history, CSV export (Bearer JWT)."""
from __future__ import annotations

import csv
import io

from flask import Blueprint, Response, jsonify, stream_with_context

from api_service import schemas as s
from api_service.contract import operation
from api_service.transactions_view import detailed_page
from shared import accounts, history

bp = Blueprint("wallet", __name__, url_prefix="/api/wallet")
TAGS = ("wallet",)


@bp.get("/balance")
@operation("The caller's balance", auth_as="user", tags=TAGS,
           responses={200: s.BalanceOut, 404: s.ErrorOut})
def balance(principal):
    a = accounts.get_or_raise(user_id=principal.user_id)
    return jsonify({"balance_cents": a.balance_cents, "currency": a.currency,
                    "last_seq": a.last_seq, "updated_at": a.updated_at.isoformat()})


@bp.get("/transactions")
@operation("The caller's transactions, newest first", auth_as="user", query=s.PageQuery,
           tags=TAGS, responses={200: s.TransactionPage})
def transactions(principal, query):
    total, rows, _ = history.page(user_id=principal.user_id, skip=query.skip, limit=query.limit)
    return jsonify({"total": total, "transactions": rows})


@bp.get("/transactions/detailed")
@operation("The caller's transactions, filtered, with keyset paging", auth_as="user",
           query=s.DetailedQuery, tags=TAGS, responses={200: s.DetailedPage})
def transactions_detailed(principal, query):
    return jsonify(detailed_page(principal.user_id, query))


@bp.get("/transactions/export.csv")
@operation("The caller's transactions as CSV", auth_as="user", query=s.ExportQuery, tags=TAGS,
           responses={200: None}, content_type="text/csv")
def export_csv(principal, query):
    batches = history.export_batches(user_id=principal.user_id, tx_type=query.type,
                                     start=query.start_date, end=query.end_date)

    def generate():
        """The header at once, then one chunk per batch of rows."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(history.CSV_COLUMNS)
        yield buf.getvalue()
        for batch in batches:
            buf.seek(0)
            buf.truncate()
            writer.writerows(batch)
            yield buf.getvalue()

    return Response(stream_with_context(generate()), mimetype="text/csv", headers={
        "Content-Disposition": "attachment; filename=transactions.csv"})
