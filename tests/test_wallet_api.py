"""Wallet contract (DESIGN.md "Wallet and notifications"): balance, history pages with
filters and keyset cursors, CSV export, and one user never seeing another's data."""
import csv
import io
from datetime import datetime

import pytest

from tests.support import assert_error

pytestmark = pytest.mark.smoke

TX_KEYS = {"id", "seq", "user_id", "amount_cents", "type", "status", "description", "service",
           "verification_id", "reference", "balance_after_cents", "created_at"}
TYPES = ("credit", "sms_purchase", "verification_refund", "adjustment")


def history(api, uid: str) -> list[dict]:
    """Build a ledger of 6 movements covering all four types; returns them oldest first."""
    api.account(uid)
    s = api.service
    rows = [
        api.client.post(f"/api/v1/accounts/{uid}/credits", headers=s,
                        json={"amount_cents": 2000, "payment_id": f"{uid}-pay-1"}),
        api.purchase(uid, 150, vid=f"{uid}-v1"),
        api.purchase(uid, 300, vid=f"{uid}-v2"),
        api.client.post(f"/api/v1/verifications/{uid}-v2/cancel", headers=s, json={}),
        api.client.post(f"/api/v1/accounts/{uid}/adjustments", headers=s,
                        json={"amount_cents": -50, "reason": "fee",
                              "idempotency_key": f"{uid}-adj-1"}),
        api.client.post(f"/api/v1/accounts/{uid}/credits", headers=s,
                        json={"amount_cents": 500, "payment_id": f"{uid}-pay-2"}),
    ]
    assert all(r.status_code in (200, 201) for r in rows)
    return [r.get_json().get("transaction") or r.get_json()["refund"] for r in rows]


def get(api, uid, path, **query):
    return api.client.get(f"/api/wallet{path}", headers=api.user(uid), query_string=query)


# -- balance -----------------------------------------------------------------------------

def test_balance__fields(api):
    history(api, "u1")
    r = get(api, "u1", "/balance")
    assert r.status_code == 200
    body = r.get_json()
    assert set(body) == {"balance_cents", "currency", "last_seq", "updated_at"}
    assert (body["balance_cents"], body["currency"], body["last_seq"]) == (2300, "USD", 6)
    assert datetime.fromisoformat(body["updated_at"]).utcoffset().total_seconds() == 0


def test_balance__no_account__404(api):
    assert_error(get(api, "ghost", "/balance"), 404, "not_found")


def test_balance__service_key__403(api):
    history(api, "u1")
    assert_error(api.client.get("/api/wallet/balance", headers=api.service), 403, "forbidden")


# -- transactions ------------------------------------------------------------------------

def test_transactions__newest_first_with_total(api):
    txs = history(api, "u1")
    r = get(api, "u1", "/transactions")
    assert r.status_code == 200
    body = r.get_json()
    assert set(body) == {"total", "transactions"}
    assert body["total"] == 6
    assert [t["id"] for t in body["transactions"]] == [t["id"] for t in reversed(txs)]
    assert all(set(t) == TX_KEYS for t in body["transactions"])


def test_transactions__skip_and_limit(api):
    history(api, "u1")
    body = get(api, "u1", "/transactions", skip=1, limit=2).get_json()
    assert body["total"] == 6
    assert [t["seq"] for t in body["transactions"]] == [5, 4]
    tail = get(api, "u1", "/transactions", skip=5, limit=50).get_json()
    assert [t["seq"] for t in tail["transactions"]] == [1]
    past = get(api, "u1", "/transactions", skip=10).get_json()
    assert (past["total"], past["transactions"]) == (6, [])


def test_transactions__no_account__empty_page(api):
    body = get(api, "ghost", "/transactions").get_json()
    assert (body["total"], body["transactions"]) == (0, [])


@pytest.mark.parametrize("path", ["/transactions", "/transactions/detailed"])
@pytest.mark.parametrize("limit,ok", [(0, False), (1, True), (200, True), (201, False),
                                      (-1, False), ("ten", False), ("1.5", False)])
def test_transactions__limit_bounds(api, path, limit, ok):
    history(api, "u1")
    r = get(api, "u1", path, limit=limit)
    if ok:
        assert r.status_code == 200
        assert len(r.get_json()["transactions"]) == min(limit, 6)
    else:
        err = assert_error(r, 422, "validation_error")
        assert any(f["field"] == "limit" for f in err["details"]["fields"])


@pytest.mark.parametrize("query", [{"skip": -1}, {"skip": "x"}, {"page": 2}])
def test_transactions__bad_skip_or_unknown_param__422(api, query):
    assert_error(get(api, "u1", "/transactions", **query), 422, "validation_error")


# -- detailed ----------------------------------------------------------------------------

def test_detailed__shape_and_newest_first(api):
    txs = history(api, "u1")
    body = get(api, "u1", "/transactions/detailed").get_json()
    assert set(body) == {"total", "transactions", "next_cursor"}
    assert body["total"] == 6 and body["next_cursor"] is None
    assert [t["id"] for t in body["transactions"]] == [t["id"] for t in reversed(txs)]


@pytest.mark.parametrize("tx_type,seqs", [("credit", [6, 1]), ("sms_purchase", [3, 2]),
                                          ("verification_refund", [4]), ("adjustment", [5])])
def test_detailed__type_filter(api, tx_type, seqs):
    history(api, "u1")
    body = get(api, "u1", "/transactions/detailed", type=tx_type).get_json()
    assert body["total"] == len(seqs)
    assert [t["seq"] for t in body["transactions"]] == seqs
    assert {t["type"] for t in body["transactions"]} == {tx_type}


@pytest.mark.parametrize("tx_type", ["debit", "refund", "CREDIT", ""])
def test_detailed__unknown_type__422(api, tx_type):
    err = assert_error(get(api, "u1", "/transactions/detailed", type=tx_type), 422,
                       "validation_error")
    assert any(f["field"] == "type" for f in err["details"]["fields"])


def test_detailed__date_filters(api):
    txs = history(api, "u1")
    middle = txs[2]["created_at"]  # seq 3, with its +00:00 offset
    after = get(api, "u1", "/transactions/detailed", start_date=middle).get_json()
    assert [t["seq"] for t in after["transactions"]] == [6, 5, 4, 3]
    assert after["total"] == 4
    before = get(api, "u1", "/transactions/detailed", end_date=middle).get_json()
    assert [t["seq"] for t in before["transactions"]] == [3, 2, 1]
    only = get(api, "u1", "/transactions/detailed", start_date=middle, end_date=middle)
    assert [t["seq"] for t in only.get_json()["transactions"]] == [3]
    both = get(api, "u1", "/transactions/detailed", start_date=middle, type="sms_purchase")
    assert [t["seq"] for t in both.get_json()["transactions"]] == [3]


@pytest.mark.parametrize("field", ["start_date", "end_date"])
@pytest.mark.parametrize("value", ["yesterday", "2026-13-01T00:00:00+00:00",
                                   "2026-01-01T00:00:00"])  # the last one has no offset
def test_detailed__bad_date__422(api, field, value):
    err = assert_error(get(api, "u1", "/transactions/detailed", **{field: value}), 422,
                       "validation_error")
    assert any(f["field"] == field for f in err["details"]["fields"])


@pytest.mark.parametrize("limit", [1, 2, 4, 6, 7])
def test_detailed__cursor_pages_through_all_rows_once(api, limit):
    txs = history(api, "u1")
    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        body = get(api, "u1", "/transactions/detailed", **query).get_json()
        assert body["total"] == 6
        assert len(body["transactions"]) <= limit
        seen += [t["id"] for t in body["transactions"]]
        cursor, pages = body["next_cursor"], pages + 1
        if cursor is None:
            break
        assert pages < 10
    assert seen == [t["id"] for t in reversed(txs)]
    assert pages == -(-6 // limit)


def test_detailed__cursor_is_stable_while_new_rows_arrive(api):
    txs = history(api, "u1")
    first = get(api, "u1", "/transactions/detailed", limit=3).get_json()
    api.client.post("/api/v1/accounts/u1/credits", headers=api.service,
                    json={"amount_cents": 100, "payment_id": "late"})
    second = get(api, "u1", "/transactions/detailed", limit=3,
                 cursor=first["next_cursor"]).get_json()
    assert [t["id"] for t in second["transactions"]] == [t["id"] for t in reversed(txs[:3])]
    assert second["next_cursor"] is None


def test_detailed__cursor_with_type_filter(api):
    history(api, "u1")
    page1 = get(api, "u1", "/transactions/detailed", type="credit", limit=1).get_json()
    page2 = get(api, "u1", "/transactions/detailed", type="credit", limit=1,
                cursor=page1["next_cursor"]).get_json()
    assert [t["seq"] for t in page1["transactions"] + page2["transactions"]] == [6, 1]
    assert page2["next_cursor"] is None


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", "", "1" * 19])
def test_detailed__invalid_cursor__422(api, cursor):
    history(api, "u1")
    err = assert_error(get(api, "u1", "/transactions/detailed", cursor=cursor), 422,
                       "validation_error")
    assert any(f["field"] == "cursor" for f in err["details"]["fields"])


# -- export ------------------------------------------------------------------------------

def _csv(r) -> list[list[str]]:
    return list(csv.reader(io.StringIO(r.get_data(as_text=True))))


def test_export_csv__header_and_one_row_per_transaction(api):
    txs = history(api, "u1")
    r = get(api, "u1", "/transactions/export.csv")
    assert r.status_code == 200
    assert r.mimetype == "text/csv"
    header, *rows = _csv(r)
    assert {"id", "seq", "created_at", "type", "amount_cents", "balance_after_cents"} <= set(
        header)
    assert len(rows) == len(txs) == 6
    col = {name: i for i, name in enumerate(header)}
    by_id = {str(t["id"]): t for t in txs}
    assert sorted(row[col["id"]] for row in rows) == sorted(by_id)
    for row in rows:
        tx = by_id[row[col["id"]]]
        assert row[col["type"]] == tx["type"]
        assert int(row[col["amount_cents"]]) == tx["amount_cents"]
        assert int(row[col["balance_after_cents"]]) == tx["balance_after_cents"]


def test_export_csv__same_filters_as_detailed(api):
    txs = history(api, "u1")
    credits = _csv(get(api, "u1", "/transactions/export.csv", type="credit"))
    assert len(credits) == 1 + 2
    since = _csv(get(api, "u1", "/transactions/export.csv", start_date=txs[3]["created_at"]))
    assert len(since) == 1 + 3


def test_export_csv__no_transactions__header_only(api):
    api.account("u1")
    r = get(api, "u1", "/transactions/export.csv")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert len(_csv(r)) == 1


@pytest.mark.parametrize("query", [{"type": "debit"}, {"start_date": "nope"},
                                   {"limit": 10}])
def test_export_csv__bad_query__422(api, query):
    assert_error(get(api, "u1", "/transactions/export.csv", **query), 422, "validation_error")


# -- isolation ---------------------------------------------------------------------------

def test_wallet__user_never_sees_another_users_data(api):
    mine = history(api, "u1")
    theirs = history(api, "u2")
    their_ids = {t["id"] for t in theirs}
    for path in ("/transactions", "/transactions/detailed"):
        body = get(api, "u1", path, limit=200).get_json()
        assert body["total"] == 6
        assert {t["user_id"] for t in body["transactions"]} == {"u1"}
        assert not their_ids & {t["id"] for t in body["transactions"]}
    header, *rows = _csv(get(api, "u1", "/transactions/export.csv"))
    assert {int(r[header.index("id")]) for r in rows} == {t["id"] for t in mine}
    assert get(api, "u1", "/balance").get_json()["balance_cents"] == 2300
    # A cursor taken from someone else's page still only walks the caller's rows.
    body = get(api, "u1", "/transactions/detailed", cursor=str(10 ** 6)).get_json()
    assert {t["user_id"] for t in body["transactions"]} == {"u1"}


def test_notifications__reading_someone_elses__404_and_stays_unread(api):
    history(api, "u1")
    history(api, "u2")
    theirs = api.client.get("/api/notifications", headers=api.user("u2")).get_json()
    target = theirs["notifications"][0]["id"]
    r = api.client.post(f"/api/notifications/{target}/read", headers=api.user("u1"))
    assert_error(r, 404, "not_found")
    after = api.client.get("/api/notifications", headers=api.user("u2")).get_json()
    assert after["unread_count"] == theirs["unread_count"]
    mine = api.client.get("/api/notifications", headers=api.user("u1")).get_json()
    assert target not in {n["id"] for n in mine["notifications"]}
