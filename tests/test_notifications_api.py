"""Notifications contract (DESIGN.md "Wallet and notifications", the seed's texts): one
in-app notification per transaction, the inbox, read state, low balance, preferences."""
import pytest

from tests.support import assert_error, invariant_violations

pytestmark = pytest.mark.smoke

NOTIFICATION_KEYS = {"id", "type", "title", "message", "link", "icon", "transaction_id", "read",
                     "created_at", "email_status", "deliveries"}
DELIVERY_KEYS = {"channel", "status", "attempts", "last_error", "updated_at"}
DEFAULT_PREFERENCES = {"email_on_credit": True, "email_on_debit": True,
                       "email_on_refund": True, "push_on_credit": True,
                       "push_on_debit": False, "push_on_refund": True,
                       "min_amount_notify_cents": 0}


def inbox(api, uid="u1", **query) -> dict:
    r = api.client.get("/api/notifications", headers=api.user(uid), query_string=query)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def of_type(api, uid, ntype) -> list[dict]:
    return [n for n in inbox(api, uid, limit=200)["notifications"] if n["type"] == ntype]


# -- what users are told -----------------------------------------------------------------

def test_credit__notifies_credits_added(api):
    api.account("u1")
    r = api.client.post("/api/v1/accounts/u1/credits", headers=api.service,
                        json={"amount_cents": 2000, "payment_id": "pay-1"})
    body = inbox(api)
    assert body["unread_count"] == 1
    [n] = body["notifications"]
    assert set(n) == NOTIFICATION_KEYS
    assert (n["type"], n["title"]) == ("credit_added", "Credits Added")
    assert n["message"] == "$20.00 added to your account. New balance: $20.00"
    assert (n["link"], n["icon"]) == ("/wallet", "add_circle")
    assert n["transaction_id"] == r.get_json()["transaction"]["id"]
    assert n["read"] is False
    assert n["email_status"] == "pending"  # no worker ran
    assert [set(d) for d in n["deliveries"]] == [DELIVERY_KEYS] * 2
    assert [(d["channel"], d["status"], d["attempts"], d["last_error"])
            for d in n["deliveries"]] == [("email", "pending", 0, None),
                                          ("push", "pending", 0, None)]
    assert n["created_at"].endswith("+00:00")


def test_purchase__notifies_credits_used(api):
    api.account("u1", 2000)
    charge = api.purchase("u1", 150, vid="v1").get_json()["transaction"]
    [n] = of_type(api, "u1", "credit_deducted")
    assert n["title"] == "Credits Used"
    assert n["message"] == "$1.50 deducted for WhatsApp verification. New balance: $18.50"
    assert (n["link"], n["icon"]) == ("/verify/v1", "credit_card")
    assert n["transaction_id"] == charge["id"]


def test_refund__notifies_instant_refund_processed(api):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    r = api.client.post("/api/v1/verifications/v1/cancel", headers=api.service,
                        json={"reason": "no SMS received"})
    [n] = of_type(api, "u1", "instant_refund")
    assert n["title"] == "Instant Refund Processed"
    assert n["message"] == "$1.50 refunded for WhatsApp (no SMS received). New balance: $20.00"
    assert (n["link"], n["icon"]) == ("/wallet", "money_back")
    assert n["transaction_id"] == r.get_json()["refund"]["id"]


def test_refund__replayed_cancel_notifies_once(api):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    for _ in range(3):
        api.client.post("/api/v1/verifications/v1/cancel", headers=api.service, json={})
    assert len(of_type(api, "u1", "instant_refund")) == 1
    assert invariant_violations(api.app) == []


def test_adjustment__notifies_balance_adjusted(api):
    api.account("u1", 2000)
    r = api.client.post("/api/v1/accounts/u1/adjustments", headers=api.service,
                        json={"amount_cents": -500, "reason": "chargeback",
                              "idempotency_key": "adj-1"})
    [n] = of_type(api, "u1", "balance_adjusted")
    assert n["transaction_id"] == r.get_json()["transaction"]["id"]
    assert "$5.00" in n["message"] and "$15.00" in n["message"]


def test_every_transaction__exactly_one_notification(api):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    api.purchase("u1", 150, vid="v2")
    api.client.post("/api/v1/verifications/v2/fail", headers=api.service)
    txs = api.client.get("/api/wallet/transactions", headers=api.user("u1")).get_json()
    notes = inbox(api)["notifications"]
    assert sorted(n["transaction_id"] for n in notes) == sorted(
        t["id"] for t in txs["transactions"])
    assert invariant_violations(api.app) == []


def test_rejected_purchase__no_notification(api):
    api.account("u1", 100)
    before = inbox(api)
    assert api.purchase("u1", 150, vid="v1").status_code == 402
    assert inbox(api) == before


# -- low balance -------------------------------------------------------------------------

def test_low_balance__notified_once_when_purchase_crosses_threshold(api):
    api.account("u1", 1000, low_balance_threshold_cents=500)
    api.purchase("u1", 500, vid="v1")  # 1000 -> 500: at the threshold, not below
    assert of_type(api, "u1", "low_balance") == []
    api.purchase("u1", 100, vid="v2")  # 500 -> 400: crosses
    [n] = of_type(api, "u1", "low_balance")
    assert n["title"] and "$4.00" in n["message"]
    api.purchase("u1", 100, vid="v3")  # 400 -> 300: already below, no new warning
    assert len(of_type(api, "u1", "low_balance")) == 1


def test_low_balance__threshold_is_per_account(api):
    api.account("u1", 1000, low_balance_threshold_cents=0)
    api.account("u2", 1000, low_balance_threshold_cents=950)
    api.purchase("u1", 1000, vid="v1")
    api.purchase("u2", 100, vid="v2")
    assert of_type(api, "u1", "low_balance") == []
    assert len(of_type(api, "u2", "low_balance")) == 1


def test_low_balance__not_sent_for_credits(api):
    api.account("u1", 50, low_balance_threshold_cents=500)
    assert of_type(api, "u1", "low_balance") == []


# -- inbox -------------------------------------------------------------------------------

def test_list__newest_first(api):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    api.client.post("/api/v1/verifications/v1/cancel", headers=api.service)
    notes = inbox(api)["notifications"]
    assert [n["type"] for n in notes] == ["instant_refund", "credit_deducted", "credit_added"]
    assert [n["id"] for n in notes] == sorted((n["id"] for n in notes), reverse=True)


def test_read__marks_one_and_lowers_unread_count(api):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    oldest = inbox(api)["notifications"][-1]
    r = api.client.post(f"/api/notifications/{oldest['id']}/read", headers=api.user("u1"))
    assert r.status_code == 200
    assert set(r.get_json()) == NOTIFICATION_KEYS  # `deliveries` comes with issue 12
    assert r.get_json()["id"] == oldest["id"] and r.get_json()["read"] is True
    again = api.client.post(f"/api/notifications/{oldest['id']}/read", headers=api.user("u1"))
    assert again.status_code == 200 and again.get_json()["read"] is True
    body = inbox(api)
    assert body["unread_count"] == 1
    unread = inbox(api, unread_only="true")
    assert [n["type"] for n in unread["notifications"]] == ["credit_deducted"]
    assert unread["unread_count"] == 1


def test_read__unknown_id__404(api):
    api.account("u1", 2000)
    assert_error(api.client.post("/api/notifications/999999/read", headers=api.user("u1")),
                 404, "not_found")


@pytest.mark.parametrize("notification_id", [0, 2 ** 63, 10 ** 30])
def test_read__id_beyond_any_row__404(api, notification_id):
    api.account("u1", 2000)
    r = api.client.post(f"/api/notifications/{notification_id}/read", headers=api.user("u1"))
    assert_error(r, 404, "not_found")
    assert inbox(api)["unread_count"] == 1


def test_read_all__returns_updated_count(api):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    api.account("u2", 700)
    r = api.client.post("/api/notifications/read-all", headers=api.user("u1"))
    assert r.status_code == 200
    assert r.get_json() == {"updated": 2}
    assert inbox(api)["unread_count"] == 0
    assert inbox(api, unread_only="true")["notifications"] == []
    assert all(n["read"] for n in inbox(api)["notifications"])
    again = api.client.post("/api/notifications/read-all", headers=api.user("u1"))
    assert again.get_json() == {"updated": 0}
    assert inbox(api, "u2")["unread_count"] == 1  # someone else's stay unread


def test_list__cursor_pages_without_gaps(api):
    api.account("u1", 2000)
    for i in range(4):
        api.purchase("u1", 100, vid=f"v{i}")
    everything = [n["id"] for n in inbox(api)["notifications"]]
    assert len(everything) == 5
    seen, cursor = [], None
    for _ in range(5):
        body = inbox(api, limit=2, **({"cursor": cursor} if cursor else {}))
        seen += [n["id"] for n in body["notifications"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == everything
    assert cursor is None


def test_list__unread_only_pages_with_cursor(api):
    api.account("u1", 2000)
    for i in range(3):
        api.purchase("u1", 100, vid=f"v{i}")
    first = inbox(api)["notifications"][0]["id"]
    api.client.post(f"/api/notifications/{first}/read", headers=api.user("u1"))
    page1 = inbox(api, unread_only="true", limit=2)
    page2 = inbox(api, unread_only="true", limit=2, cursor=page1["next_cursor"])
    ids = [n["id"] for n in page1["notifications"] + page2["notifications"]]
    assert len(ids) == 3 and first not in ids
    assert page2["next_cursor"] is None


@pytest.mark.parametrize("limit,ok", [(0, False), (1, True), (200, True), (201, False),
                                      ("x", False)])
def test_list__limit_bounds(api, limit, ok):
    api.account("u1", 2000)
    api.purchase("u1", 100, vid="v1")
    r = api.client.get("/api/notifications", headers=api.user("u1"),
                       query_string={"limit": limit})
    if ok:
        assert r.status_code == 200
        assert len(r.get_json()["notifications"]) == min(limit, 2)
    else:
        err = assert_error(r, 422, "validation_error")
        assert any(f["field"] == "limit" for f in err["details"]["fields"])


@pytest.mark.parametrize("query", [{"cursor": "abc"}, {"cursor": "-5"},
                                   {"unread_only": "maybe"}, {"page": "2"}])
def test_list__bad_query__422(api, query):
    r = api.client.get("/api/notifications", headers=api.user("u1"), query_string=query)
    assert_error(r, 422, "validation_error")


# -- preferences -------------------------------------------------------------------------

def test_preferences__defaults(api):
    r = api.client.get("/api/notifications/preferences", headers=api.user("u1"))
    assert r.status_code == 200
    assert r.get_json() == DEFAULT_PREFERENCES


def test_preferences__put_partial_update_keeps_the_rest(api):
    user = api.user("u1")
    r = api.client.put("/api/notifications/preferences", headers=user,
                       json={"push_on_debit": True})
    assert r.status_code == 200
    assert r.get_json() == DEFAULT_PREFERENCES | {"push_on_debit": True}
    r = api.client.put("/api/notifications/preferences", headers=user,
                       json={"email_on_credit": False, "min_amount_notify_cents": 500})
    expected = DEFAULT_PREFERENCES | {"push_on_debit": True, "email_on_credit": False,
                                      "min_amount_notify_cents": 500}
    assert r.get_json() == expected
    assert api.client.get("/api/notifications/preferences", headers=user).get_json() == expected
    # Another user's preferences are untouched.
    other = api.client.get("/api/notifications/preferences", headers=api.user("u2"))
    assert other.get_json() == DEFAULT_PREFERENCES


def test_preferences__empty_put_changes_nothing(api):
    r = api.client.put("/api/notifications/preferences", headers=api.user("u1"), json={})
    assert r.status_code == 200
    assert r.get_json() == DEFAULT_PREFERENCES


@pytest.mark.parametrize("body", [
    {"push_on_sms": True}, {"push_on_debit": True, "sms_on_debit": True},
    {"push_on_debit": "true"}, {"push_on_debit": 1}, {"email_on_refund": "no"},
    {"min_amount_notify_cents": -1}, {"min_amount_notify_cents": 1.5},
    {"min_amount_notify_cents": "100"}, {"min_amount_notify_cents": True},
    {"min_amount_notify_cents": 1_000_000_001}])
def test_preferences__unknown_or_invalid_field__422_nothing_changed(api, body):
    user = api.user("u1")
    api.client.put("/api/notifications/preferences", headers=user, json={"push_on_debit": True})
    r = api.client.put("/api/notifications/preferences", headers=user, json=body)
    err = assert_error(r, 422, "validation_error")
    assert {f["field"] for f in err["details"]["fields"]} & set(body)
    after = api.client.get("/api/notifications/preferences", headers=user).get_json()
    assert after == DEFAULT_PREFERENCES | {"push_on_debit": True}


@pytest.mark.parametrize("raw", [b"{", b"[]", b'[{"push_on_debit": true}]', b"true"])
def test_preferences__body_not_a_json_object__400(api, raw):
    r = api.client.put("/api/notifications/preferences", data=raw,
                       headers={**api.user("u1"), "Content-Type": "application/json"})
    assert_error(r, 400, "bad_request")
    assert api.client.get("/api/notifications/preferences",
                          headers=api.user("u1")).get_json() == DEFAULT_PREFERENCES
