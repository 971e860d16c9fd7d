"""The read side against plain SQL over the raw rows: history totals and pages, the monitor's
figures and series, the CSV export, the account timeline. Data is written with plain SQL
(not the ledger), so the trigger-kept counts are checked for rows written that way too."""
from __future__ import annotations

import csv
import io
import random
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from sqlalchemy import event, text

from tests.support import assert_error

pytestmark = pytest.mark.smoke

TYPES = ("credit", "sms_purchase", "verification_refund", "adjustment")
NOW = datetime(2026, 3, 4, 12, 30, 17, 250000, tzinfo=timezone.utc)


def _insert(ctx, user_id: str, times: list[datetime], rng: random.Random, first_seq: int = 1,
            descriptions=None) -> None:
    """An account and one transaction per time, in seq order, by plain SQL."""
    from shared.db import db
    from shared.models import Account, Transaction

    if first_seq == 1:
        db.session.execute(Account.__table__.insert(), [dict(
            user_id=user_id, balance_cents=0, currency="USD", last_seq=0,
            low_balance_threshold_cents=0, created_at=NOW, updated_at=NOW)])
    rows = []
    for i, at in enumerate(times):
        kind = rng.choice(TYPES)
        amount = rng.randint(1, 999) * (-1 if kind == "sms_purchase" else 1)
        rows.append(dict(user_id=user_id, seq=first_seq + i, amount_cents=amount,
                         balance_after_cents=0, type=kind, status="completed",
                         description=(descriptions or {}).get(i), created_at=at))
    if rows:
        db.session.execute(Transaction.__table__.insert(), rows)
    db.session.execute(text("UPDATE accounts SET last_seq = :n WHERE user_id = :u"),
                       {"n": first_seq + len(times) - 1, "u": user_id})
    db.session.commit()


def _random_times(rng, n, span=timedelta(days=2)):
    return sorted(NOW - timedelta(microseconds=rng.randrange(int(span.total_seconds() * 1e6)))
                  for _ in range(n))


def _sql_count(ctx, user_id, tx_type=None, start=None, end=None) -> int:
    from shared.db import db

    q = "SELECT count(*) FROM transactions WHERE user_id = :u"
    if tx_type:
        q += " AND type = :t"
    if start:
        q += " AND created_at >= :s"
    if end:
        q += " AND created_at <= :e"
    from shared.models import Transaction
    col = Transaction.__table__.c.created_at.type
    dialect = db.session.get_bind().dialect
    bind = {"u": user_id, "t": tx_type,
            "s": col.process_bind_param(start, dialect) if start else None,
            "e": col.process_bind_param(end, dialect) if end else None}
    return db.session.execute(text(q), bind).scalar()


def test_history_totals_and_pages_equal_sql_for_random_filters(ctx, client, api):
    from shared import history

    rng = random.Random(14)
    _insert(ctx, "u-big", _random_times(rng, 400), rng)
    _insert(ctx, "u-small", _random_times(rng, 30), rng)
    for _ in range(40):
        tx_type = rng.choice((None, *TYPES))
        start = NOW - timedelta(seconds=rng.randrange(3 * 86400)) if rng.random() < .6 else None
        end = NOW - timedelta(seconds=rng.randrange(86400)) if rng.random() < .4 else None
        total, rows, _ = history.page(user_id="u-big", tx_type=tx_type, start=start, end=end,
                                      limit=200)
        assert total == _sql_count(ctx, "u-big", tx_type, start, end)
        assert len(rows) == min(total, 200)
        assert all((tx_type is None or r["type"] == tx_type) for r in rows)
    # an offset in the query string is the same instant in UTC
    start = NOW - timedelta(hours=20)
    offset = start.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()
    r = client.get(f"/api/wallet/transactions/detailed?start_date={quote(offset)}&limit=1",
                   headers=api.user("u-big"))
    assert r.status_code == 200 and r.get_json()["total"] == _sql_count(ctx, "u-big", start=start)


def test_skip_pages_equal_offset_pages_with_and_without_seq_gaps(ctx, client, api):
    from shared.db import db

    rng = random.Random(7)
    _insert(ctx, "u-skip", _random_times(rng, 120), rng)
    everything = client.get("/api/wallet/transactions/detailed?limit=200",
                            headers=api.user("u-skip")).get_json()["transactions"]
    for skip in (0, 1, 49, 119, 120, 500):
        r = client.get(f"/api/wallet/transactions?skip={skip}&limit=7", headers=api.user("u-skip"))
        assert r.get_json() == {"total": 120, "transactions": everything[skip:skip + 7]}
    # A gap in the seqs (a row deleted by plain SQL): skip still counts rows, not seqs.
    db.session.execute(text("DELETE FROM transactions WHERE user_id = 'u-skip' AND seq = 100"))
    db.session.commit()
    rest = [t for t in everything if t["seq"] != 100]
    r = client.get("/api/wallet/transactions?skip=10&limit=30", headers=api.user("u-skip"))
    assert r.get_json() == {"total": 119, "transactions": rest[10:40]}


def _sql_monitor(ctx, minutes, now):
    """The monitor's figures, straight from the raw rows."""
    from shared import history
    from shared.db import db
    from shared.models import Transaction

    cutoff = now - timedelta(minutes=minutes)
    rows = [r for r in db.session.execute(text(
        "SELECT user_id, type, amount_cents, created_at FROM transactions")).all()]
    dialect = db.session.get_bind().dialect
    col = Transaction.__table__.c.created_at.type
    rows = [(u, t, a, col.process_result_value(c if isinstance(c, datetime)
                                               else datetime.fromisoformat(c), dialect))
            for u, t, a, c in rows]
    rows = [r for r in rows if r[3] >= cutoff]
    width = history.bucket_minutes(minutes) * 60
    buckets = {}
    for _, kind, amount, at in rows:
        b = buckets.setdefault(int(at.timestamp()) // width, [0, 0, 0, 0])
        b[0] += 1
        b[1] += amount if kind == "credit" else 0
        b[2] += -amount if kind == "sms_purchase" else 0
        b[3] += amount if kind == "verification_refund" else 0
    return {"total_transactions": len(rows),
            "credits_added_cents": sum(a for _, k, a, _ in rows if k == "credit"),
            "credits_spent_cents": -sum(a for _, k, a, _ in rows if k == "sms_purchase"),
            "refunds_issued_cents": sum(a for _, k, a, _ in rows if k == "verification_refund"),
            "unique_users": len({u for u, *_ in rows}),
            "by_type": {k: sum(1 for r in rows if r[1] == k) for k in {r[1] for r in rows}},
            "buckets": {b: v for b, v in buckets.items()}}


def test_monitor_figures_and_series_equal_sql_for_random_windows(ctx):
    from shared import history

    rng = random.Random(3)
    for i in range(12):
        _insert(ctx, f"m-{i}", _random_times(rng, rng.randrange(0, 60), timedelta(days=8)), rng)
    for minutes in (1, 7, 60, 180, 181, 1440, 1441, 10080, *rng.sample(range(1, 10081), 6)):
        now = NOW - timedelta(seconds=rng.randrange(0, 7200), microseconds=rng.randrange(10**6))
        got = history.monitor(minutes=minutes, now=now)
        want = _sql_monitor(ctx, minutes, now)
        for key in ("total_transactions", "credits_added_cents", "credits_spent_cents",
                    "refunds_issued_cents", "unique_users", "by_type"):
            assert got[key] == want[key], (minutes, key)
        width = history.bucket_minutes(minutes) * 60
        series = {int(datetime.fromisoformat(b["start"]).timestamp()) // width:
                  [b["transactions"], b["credits_added_cents"], b["credits_spent_cents"],
                   b["refunds_issued_cents"]] for b in got["series"]}
        assert {b: v for b, v in series.items() if v[0]} == want["buckets"], minutes
        assert min(series) == int((now - timedelta(minutes=minutes)).timestamp()) // width
        assert len(series) == len(got["series"])  # one entry per bucket, no duplicates


def test_monitor_empty_window_has_zero_figures_and_zero_buckets(ctx, client, api):
    r = client.get("/api/admin/transactions/monitor?minutes=5", headers=api.admin())
    body = r.get_json()
    assert r.status_code == 200 and body["total_transactions"] == 0
    assert body["bucket_minutes"] == 1 and len(body["series"]) in (5, 6)
    assert all(b["transactions"] == 0 for b in body["series"])


def test_csv_equals_the_json_history_and_prefixes_formula_cells(ctx, client, api):
    rng = random.Random(5)
    formulas = {0: "=HYPERLINK(\"http://evil\")", 1: "+1", 2: "-2", 3: "@SUM(A1)", 4: "\tx",
                5: "\rx", 6: "plain, with comma"}
    _insert(ctx, "u-csv", _random_times(rng, 30), rng, descriptions=formulas)
    page = client.get("/api/wallet/transactions/detailed?limit=200&type=credit",
                      headers=api.user("u-csv")).get_json()["transactions"]
    r = client.get("/api/wallet/transactions/export.csv?type=credit", headers=api.user("u-csv"))
    assert r.status_code == 200 and r.mimetype == "text/csv"
    rows = list(csv.reader(io.StringIO(r.get_data(as_text=True), newline="")))
    from shared.history import CSV_COLUMNS
    assert rows[0] == list(CSV_COLUMNS)
    assert [row[1] for row in rows[1:]] == [str(t["seq"]) for t in page]
    for row, tx in zip(rows[1:], page):
        for column, cell in zip(CSV_COLUMNS, row):
            value = tx[column]
            if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
                value = "'" + value
            assert cell == ("" if value is None else str(value)), column
    everything = client.get("/api/wallet/transactions/export.csv", headers=api.user("u-csv"))
    text_ = everything.get_data(as_text=True)
    assert "'=HYPERLINK" in text_ and "'@SUM" in text_ and "'+1" in text_


def test_csv_streams_in_batches_before_the_export_is_read(ctx, client, api, monkeypatch):
    from shared import history
    from shared.db import db

    rng = random.Random(9)
    _insert(ctx, "u-stream", _random_times(rng, 95), rng)
    monkeypatch.setattr(history, "EXPORT_BATCH", 10)
    queries = []
    engine = db.engine

    def count(conn, cursor, statement, *args):
        if "FROM transactions" in statement and "ORDER BY" in statement:
            queries.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        # The view's own streaming, under the admission middleware (which i13 makes release
        # its slot for a streamed body).
        from flask import Flask
        from werkzeug.test import Client
        from werkzeug.wrappers import Response

        view = Client(lambda environ, start: Flask.wsgi_app(ctx, environ, start), Response)
        r = view.get("/api/wallet/transactions/export.csv", headers=api.user("u-stream"),
                     buffered=False)
        assert r.is_streamed
        chunks = iter(r.response)
        first = next(chunks)
        assert first.startswith(b"id,seq,")
        assert queries == []  # the header leaves before any row is read
        second = next(chunks)
        assert len(queries) == 1 and second.count(b"\n") == 10  # then one chunk per batch
        body = first + second + b"".join(chunks)
        assert len(queries) == 10  # 95 rows in batches of 10
    finally:
        event.remove(engine, "before_cursor_execute", count)
        r.close()
    assert body.count(b"\n") == 96


def test_timeline_orders_same_instant_events_and_pages_without_gaps(ctx, client, api):
    from shared.db import db

    rng = random.Random(11)
    same = NOW - timedelta(minutes=5)
    _insert(ctx, "u-tl", [same] * 6 + _random_times(rng, 20, timedelta(minutes=4)), rng)
    db.session.execute(text(
        "INSERT INTO notifications (user_id, type, title, message, read, created_at)"
        " VALUES ('u-tl', 'credit_added', 't', 'm', false, :at)"),
        {"at": same.replace(tzinfo=None) if db.session.get_bind().dialect.name == "sqlite"
         else same})
    db.session.commit()
    seen = []
    cursor = None
    for _ in range(20):
        url = "/api/admin/accounts/u-tl/timeline?limit=4" + (f"&cursor={cursor}" if cursor else "")
        body = client.get(url, headers=api.admin()).get_json()
        assert body["user_id"] == "u-tl" and len(body["events"]) <= 4
        seen += body["events"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    ids = [(e["kind"], e["id"]) for e in seen]
    assert len(ids) == len(set(ids)) == 27  # 26 transactions and 1 notification
    whole = client.get("/api/admin/accounts/u-tl/timeline?limit=200",
                       headers=api.admin()).get_json()["events"]
    assert [(e["kind"], e["id"]) for e in whole] == ids
    assert [e["at"] for e in whole] == sorted((e["at"] for e in whole), reverse=True)
    at_same = [(e["kind"], int(e["id"])) for e in whole if e["at"] == whole[-7]["at"]]
    assert at_same == [("notification", 1)] + [("transaction", i) for i in range(6, 0, -1)]


def test_timeline_limits_and_unknown_account(client, api):
    api.account("u-lim")
    assert_error(client.get("/api/admin/accounts/nobody/timeline", headers=api.admin()),
                 404, "not_found")
    for bad in ("limit=0", "limit=201", "cursor=abc"):
        assert_error(client.get(f"/api/admin/accounts/u-lim/timeline?{bad}",
                                headers=api.admin()), 422, "validation_error")
    ok = client.get("/api/admin/accounts/u-lim/timeline?limit=200", headers=api.admin())
    assert ok.status_code == 200 and ok.get_json()["next_cursor"] is None
    assert client.get("/api/admin/accounts/u-lim/timeline",
                      headers=api.user("u-lim")).status_code == 403
