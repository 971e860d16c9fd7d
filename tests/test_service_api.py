"""Service API contract (DESIGN.md "Service API", "Money and ids"): accounts, credits,
adjustments and the verification lifecycle, every status code the tables name."""
from datetime import datetime

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from tests.support import assert_error, invariant_violations

pytestmark = pytest.mark.smoke

MAX = 1_000_000_000
ACCOUNT_KEYS = {"user_id", "email", "display_name", "balance_cents", "currency", "last_seq",
                "low_balance_threshold_cents", "created_at", "updated_at"}
TX_KEYS = {"id", "seq", "user_id", "amount_cents", "type", "status", "description", "service",
           "verification_id", "reference", "balance_after_cents", "created_at"}
VERIFICATION_KEYS = {"id", "user_id", "service_name", "country", "cost_cents", "status",
                     "created_at", "expires_at", "charge_transaction_id",
                     "refund_transaction_id"}
# Values the contract rejects wherever a positive amount of cents is required.
BAD_POSITIVE_CENTS = [1.5, 100.0, "100", True, 0, -1, MAX + 1, None]
BAD_IDS = ["", "x" * 65, "has space", "slash/inside", "semi;colon", "ünïcode", 123]
# The same, as they can appear in a URL path (percent-encoded where needed).
BAD_PATH_IDS = ["x" * 65, "has%20space", "semi;colon", "%C3%BCnicode", "star*", "b@d"]


def assert_iso_utc(value: str) -> None:
    assert datetime.fromisoformat(value).utcoffset().total_seconds() == 0, value
    assert value.endswith("+00:00"), value


def ledger_state(api, uid: str) -> dict:
    """Everything a rejected call must leave untouched for one account."""
    acct = api.client.get(f"/api/v1/accounts/{uid}", headers=api.service).get_json()
    txs = api.client.get(f"/api/v1/accounts/{uid}/transactions", headers=api.service,
                         query_string={"limit": 200}).get_json()
    notes = api.client.get("/api/notifications", headers=api.user(uid),
                           query_string={"limit": 200}).get_json()
    return {"balance": acct["balance_cents"], "last_seq": acct["last_seq"],
            "transactions": [t["id"] for t in txs["transactions"]],
            "notifications": [n["id"] for n in notes["notifications"]]}


def credit(api, uid, amount=2000, payment_id="pay-1", **extra):
    return api.client.post(f"/api/v1/accounts/{uid}/credits", headers=api.service,
                           json={"amount_cents": amount, "payment_id": payment_id, **extra})


def adjust(api, uid, amount, key="adj-1", reason="chargeback"):
    return api.client.post(f"/api/v1/accounts/{uid}/adjustments", headers=api.service,
                           json={"amount_cents": amount, "reason": reason,
                                 "idempotency_key": key})


def end(api, vid, action, **body):
    return api.client.post(f"/api/v1/verifications/{vid}/{action}", headers=api.service,
                           json=body)


# -- accounts ----------------------------------------------------------------------------

def test_put_account__201_new_then_200_updated(api):
    r = api.client.put("/api/v1/accounts/u1", headers=api.service,
                       json={"email": "a@example.com", "display_name": "Ann",
                             "low_balance_threshold_cents": 500})
    assert r.status_code == 201
    acct = r.get_json()
    assert set(acct) == ACCOUNT_KEYS
    assert (acct["user_id"], acct["email"], acct["display_name"]) == ("u1", "a@example.com",
                                                                        "Ann")
    assert (acct["balance_cents"], acct["currency"], acct["last_seq"]) == (0, "USD", 0)
    assert acct["low_balance_threshold_cents"] == 500
    assert_iso_utc(acct["created_at"])
    assert_iso_utc(acct["updated_at"])

    r = api.client.put("/api/v1/accounts/u1", headers=api.service, json={"display_name": "Bo"})
    assert r.status_code == 200
    again = r.get_json()
    assert again["display_name"] == "Bo"
    assert again["email"] == "a@example.com"
    assert again["created_at"] == acct["created_at"]


def test_put_account__empty_body_creates_it(api):
    r = api.client.put("/api/v1/accounts/u1", headers=api.service)
    assert r.status_code == 201
    assert r.get_json()["balance_cents"] == 0


def test_get_account__200_and_unknown_404(api):
    api.account("u1", 2000)
    r = api.client.get("/api/v1/accounts/u1", headers=api.service)
    assert r.status_code == 200
    assert set(r.get_json()) == ACCOUNT_KEYS
    assert (r.get_json()["balance_cents"], r.get_json()["last_seq"]) == (2000, 1)
    assert_error(api.client.get("/api/v1/accounts/nobody", headers=api.service), 404,
                 "not_found")


@pytest.mark.parametrize("field,value", [
    ("email", "not-an-email"), ("email", 5), ("display_name", "x" * 101),
    ("low_balance_threshold_cents", -1), ("low_balance_threshold_cents", 1.5),
    ("low_balance_threshold_cents", "100"), ("low_balance_threshold_cents", True),
    ("low_balance_threshold_cents", MAX + 1), ("balance_cents", 100), ("nickname", "x")])
def test_put_account__invalid_field__422_and_no_account(api, field, value):
    r = api.client.put("/api/v1/accounts/u1", headers=api.service, json={field: value})
    err = assert_error(r, 422, "validation_error")
    assert any(f["field"] == field for f in err["details"]["fields"])
    assert_error(api.client.get("/api/v1/accounts/u1", headers=api.service), 404, "not_found")


@pytest.mark.parametrize("bad", BAD_PATH_IDS)
@pytest.mark.parametrize("method,suffix", [("put", ""), ("get", ""), ("post", "/credits"),
                                           ("post", "/adjustments"),
                                           ("get", "/transactions")])
def test_account_routes__bad_user_id_in_path__422(api, app, method, suffix, bad):
    r = getattr(api.client, method)(f"/api/v1/accounts/{bad}{suffix}", headers=api.service,
                                    json={})
    err = assert_error(r, 422, "validation_error")
    assert [f["field"] for f in err["details"]["fields"]] == ["user_id"]
    from shared.db import db
    from shared.models import Account

    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Account)) == 0


def test_id_of_64_allowed_chars__accepted(api):
    uid = ("Az09_.:-" * 8)[:64]
    r = api.client.put(f"/api/v1/accounts/{uid}", headers=api.service)
    assert r.status_code == 201
    assert r.get_json()["user_id"] == uid


# -- credits -----------------------------------------------------------------------------

def test_credit__201_then_replay_200_same_body(api):
    api.account("u1")
    r = credit(api, "u1", 2000, "pay-1", description="Stripe top-up")
    assert r.status_code == 201
    body = r.get_json()
    assert set(body) == {"transaction", "balance_cents"}
    tx = body["transaction"]
    assert set(tx) == TX_KEYS
    assert (tx["type"], tx["amount_cents"], tx["reference"], tx["user_id"]) == (
        "credit", 2000, "pay-1", "u1")
    assert (tx["seq"], tx["balance_after_cents"], body["balance_cents"]) == (1, 2000, 2000)
    assert_iso_utc(tx["created_at"])

    replay = credit(api, "u1", 2000, "pay-1", description="Stripe top-up")
    assert replay.status_code == 200
    assert replay.get_json() == body
    assert ledger_state(api, "u1")["balance"] == 2000
    assert invariant_violations(api.app) == []


def test_credit__same_payment_other_amount__409_nothing_changed(api):
    api.account("u1")
    credit(api, "u1", 2000, "pay-1")
    before = ledger_state(api, "u1")
    assert_error(credit(api, "u1", 2500, "pay-1"), 409, "idempotency_mismatch")
    assert ledger_state(api, "u1") == before


def test_credit__same_payment_other_user__409(api):
    api.account("u1")
    api.account("u2")
    credit(api, "u1", 2000, "pay-1")
    assert_error(credit(api, "u2", 2000, "pay-1"), 409, "idempotency_mismatch")
    assert ledger_state(api, "u2")["balance"] == 0


def test_credit__unknown_account__404(api):
    assert_error(credit(api, "nobody", 2000, "pay-1"), 404, "not_found")
    assert invariant_violations(api.app) == []


@pytest.mark.parametrize("amount", BAD_POSITIVE_CENTS)
def test_credit__invalid_amount__422_nothing_changed(api, amount):
    api.account("u1", 500)
    before = ledger_state(api, "u1")
    err = assert_error(credit(api, "u1", amount, "pay-x"), 422, "validation_error")
    assert any(f["field"] == "amount_cents" for f in err["details"]["fields"])
    assert ledger_state(api, "u1") == before


def test_credit__max_amount_accepted(api):
    api.account("u1")
    r = credit(api, "u1", MAX, "pay-max")
    assert r.status_code == 201
    assert r.get_json()["balance_cents"] == MAX


@pytest.mark.parametrize("payment_id", BAD_IDS + [None])
def test_credit__invalid_payment_id__422_nothing_changed(api, payment_id):
    api.account("u1", 500)
    before = ledger_state(api, "u1")
    err = assert_error(credit(api, "u1", 100, payment_id), 422, "validation_error")
    assert any(f["field"] == "payment_id" for f in err["details"]["fields"])
    assert ledger_state(api, "u1") == before


@pytest.mark.parametrize("body", [{"payment_id": "p"}, {"amount_cents": 100},
                                  {"amount_cents": 100, "payment_id": "p", "currency": "EUR"},
                                  {"amount_cents": 100, "payment_id": "p",
                                   "description": "x" * 201}])
def test_credit__missing_or_unknown_field__422(api, body):
    api.account("u1")
    r = api.client.post("/api/v1/accounts/u1/credits", headers=api.service, json=body)
    assert_error(r, 422, "validation_error")
    assert ledger_state(api, "u1")["transactions"] == []


@pytest.mark.parametrize("raw", [b'{"amount_cents": 1e3, "payment_id": "p"}',
                                 b'{"amount_cents": NaN, "payment_id": "p"}',
                                 b'{"amount_cents": 10000000000000000000000, "payment_id": "p"}',
                                 b'{"amount_cents": 100, "payment_id": "p\\n"}'])
def test_credit__raw_json_numbers_and_ids_outside_the_contract__422(api, raw):
    api.account("u1")
    r = api.client.post("/api/v1/accounts/u1/credits", data=raw,
                        headers={**api.service, "Content-Type": "application/json"})
    assert_error(r, 422, "validation_error")
    assert ledger_state(api, "u1")["transactions"] == []


# -- adjustments -------------------------------------------------------------------------

def test_adjustment__201_then_replay_200_same_body(api):
    api.account("u1", 1000)
    r = adjust(api, "u1", 250, "adj-1", "goodwill")
    assert r.status_code == 201
    body = r.get_json()
    assert set(body) == {"transaction", "balance_cents"}
    tx = body["transaction"]
    assert (tx["type"], tx["amount_cents"], tx["reference"], tx["seq"]) == (
        "adjustment", 250, "adj-1", 2)
    assert body["balance_cents"] == tx["balance_after_cents"] == 1250
    replay = adjust(api, "u1", 250, "adj-1", "goodwill")
    assert replay.status_code == 200
    assert replay.get_json() == body
    assert ledger_state(api, "u1")["balance"] == 1250


@pytest.mark.parametrize("amount,reason", [(300, "goodwill"), (-250, "goodwill"),
                                           (250, "another reason")])
def test_adjustment__same_key_other_parameters__409_nothing_changed(api, amount, reason):
    api.account("u1", 1000)
    adjust(api, "u1", 250, "adj-1", "goodwill")
    before = ledger_state(api, "u1")
    assert_error(adjust(api, "u1", amount, "adj-1", reason), 409, "idempotency_mismatch")
    assert ledger_state(api, "u1") == before


def test_adjustment__negative_can_make_balance_negative(api):
    api.account("u1", 1000)
    r = adjust(api, "u1", -1500, "chargeback-1")
    assert r.status_code == 201
    assert r.get_json()["balance_cents"] == -500
    assert r.get_json()["transaction"]["amount_cents"] == -1500
    assert ledger_state(api, "u1")["balance"] == -500
    assert invariant_violations(api.app) == []


def test_adjustment__unknown_account__404(api):
    assert_error(adjust(api, "nobody", 100), 404, "not_found")


@pytest.mark.parametrize("amount", [0, 1.5, -1.5, "100", True, None, MAX + 1, -MAX - 1])
def test_adjustment__invalid_amount__422_nothing_changed(api, amount):
    api.account("u1", 1000)
    before = ledger_state(api, "u1")
    err = assert_error(adjust(api, "u1", amount), 422, "validation_error")
    assert any(f["field"] == "amount_cents" for f in err["details"]["fields"])
    assert ledger_state(api, "u1") == before


@pytest.mark.parametrize("amount", [MAX, -MAX])
def test_adjustment__max_magnitude_accepted(api, amount):
    api.account("u1")
    r = adjust(api, "u1", amount)
    assert r.status_code == 201
    assert r.get_json()["balance_cents"] == amount


@pytest.mark.parametrize("body", [
    {"amount_cents": 100, "idempotency_key": "k"}, {"amount_cents": 100, "reason": "r"},
    {"amount_cents": 100, "reason": "r", "idempotency_key": "bad key"},
    {"amount_cents": 100, "reason": "r", "idempotency_key": "k" * 65},
    {"amount_cents": 100, "reason": "r", "idempotency_key": ""},
    {"amount_cents": 100, "reason": "r", "idempotency_key": "k", "extra": 1}])
def test_adjustment__missing_or_bad_field__422(api, body):
    api.account("u1", 1000)
    r = api.client.post("/api/v1/accounts/u1/adjustments", headers=api.service, json=body)
    assert_error(r, 422, "validation_error")
    assert ledger_state(api, "u1")["balance"] == 1000


# -- purchases ---------------------------------------------------------------------------

def test_purchase__201_charges_and_records_verification(api):
    api.account("u1", 2000)
    r = api.purchase("u1", 150, vid="v1")
    assert r.status_code == 201
    body = r.get_json()
    assert set(body) == {"verification", "transaction", "balance_cents"}
    ver, tx = body["verification"], body["transaction"]
    assert set(ver) == VERIFICATION_KEYS and set(tx) == TX_KEYS
    assert (ver["id"], ver["user_id"], ver["service_name"], ver["country"]) == (
        "v1", "u1", "WhatsApp", "US")
    assert (ver["cost_cents"], ver["status"], ver["refund_transaction_id"]) == (
        150, "pending", None)
    assert ver["charge_transaction_id"] == tx["id"]
    assert (tx["type"], tx["amount_cents"], tx["verification_id"], tx["service"]) == (
        "sms_purchase", -150, "v1", "WhatsApp")
    assert body["balance_cents"] == tx["balance_after_cents"] == 1850
    created, expires = (datetime.fromisoformat(ver[k]) for k in ("created_at", "expires_at"))
    assert (expires - created).total_seconds() == 300
    assert ledger_state(api, "u1")["balance"] == 1850
    assert invariant_violations(api.app) == []


def test_purchase__without_id__gets_a_contract_id(api):
    import re

    api.account("u1", 2000)
    r = api.purchase("u1", 150)
    assert r.status_code == 201
    vid = r.get_json()["verification"]["id"]
    assert re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", vid)
    assert api.client.get(f"/api/v1/verifications/{vid}", headers=api.service).status_code == 200


def test_purchase__insufficient_funds__402_nothing_changed(api):
    api.account("u1", 100)
    before = ledger_state(api, "u1")
    err = assert_error(api.purchase("u1", 150, vid="v1"), 402, "insufficient_funds")
    assert err["details"]["balance_cents"] == 100
    assert err["details"]["required_cents"] == 150
    assert ledger_state(api, "u1") == before
    assert_error(api.client.get("/api/v1/verifications/v1", headers=api.service), 404,
                 "not_found")


def test_purchase__exact_balance__201_to_zero(api):
    api.account("u1", 150)
    r = api.purchase("u1", 150, vid="v1")
    assert r.status_code == 201
    assert r.get_json()["balance_cents"] == 0
    assert_error(api.purchase("u1", 1, vid="v2"), 402, "insufficient_funds")


def test_purchase__replay_200_same_body(api):
    api.account("u1", 2000)
    first = api.purchase("u1", 150, vid="v1", timeout_seconds=600)
    replay = api.purchase("u1", 150, vid="v1", timeout_seconds=600)
    assert (first.status_code, replay.status_code) == (201, 200)
    assert replay.get_json() == first.get_json()
    assert ledger_state(api, "u1")["balance"] == 1850


def test_purchase__replay_200_even_when_balance_no_longer_covers_it(api):
    api.account("u1", 150)
    first = api.purchase("u1", 150, vid="v1")
    replay = api.purchase("u1", 150, vid="v1")
    assert (first.status_code, replay.status_code) == (201, 200)
    assert replay.get_json() == first.get_json()
    assert ledger_state(api, "u1")["balance"] == 0


def test_purchase__402_does_not_use_up_the_id(api):
    api.account("u1", 100)
    assert_error(api.purchase("u1", 150, vid="v1"), 402, "insufficient_funds")
    credit(api, "u1", 100, "pay-2")
    r = api.purchase("u1", 150, vid="v1")
    assert r.status_code == 201
    assert r.get_json()["balance_cents"] == 50


@pytest.mark.parametrize("change", [{"cost_cents": 200}, {"country": "GB"},
                                    {"service_name": "Telegram"}, {"user_id": "u2"},
                                    {"timeout_seconds": 600}])
def test_purchase__same_id_other_fields__409_nothing_changed(api, change):
    api.account("u1", 2000)
    api.account("u2", 2000)
    assert api.purchase("u1", 150, vid="v1").status_code == 201
    before = ledger_state(api, "u1"), ledger_state(api, "u2")
    body = {"id": "v1", "user_id": "u1", "service_name": "WhatsApp", "country": "US",
            "cost_cents": 150, **change}
    r = api.client.post("/api/v1/verifications", json=body, headers=api.service)
    assert_error(r, 409, "idempotency_mismatch")
    assert (ledger_state(api, "u1"), ledger_state(api, "u2")) == before


def test_purchase__unknown_account__404(api):
    assert_error(api.purchase("nobody", 150, vid="v1"), 404, "not_found")
    assert_error(api.client.get("/api/v1/verifications/v1", headers=api.service), 404,
                 "not_found")


@pytest.mark.parametrize("cost", BAD_POSITIVE_CENTS)
def test_purchase__invalid_cost__422_nothing_changed(api, cost):
    api.account("u1", 2000)
    before = ledger_state(api, "u1")
    err = assert_error(api.purchase("u1", cost, vid="v1"), 422, "validation_error")
    assert any(f["field"] == "cost_cents" for f in err["details"]["fields"])
    assert ledger_state(api, "u1") == before


def test_purchase__max_cost_accepted(api):
    api.account("u1", MAX)
    r = api.purchase("u1", MAX, vid="v1")
    assert r.status_code == 201
    assert r.get_json()["balance_cents"] == 0


@pytest.mark.parametrize("seconds,ok", [(9, False), (10, True), (86400, True), (86401, False),
                                        (10.5, False), ("300", False), (True, False)])
def test_purchase__timeout_seconds_limits(api, seconds, ok):
    api.account("u1", 2000)
    r = api.purchase("u1", 150, vid="v1", timeout_seconds=seconds)
    if ok:
        assert r.status_code == 201
        ver = r.get_json()["verification"]
        delta = (datetime.fromisoformat(ver["expires_at"])
                 - datetime.fromisoformat(ver["created_at"]))
        assert delta.total_seconds() == seconds
    else:
        err = assert_error(r, 422, "validation_error")
        assert any(f["field"] == "timeout_seconds" for f in err["details"]["fields"])
        assert ledger_state(api, "u1")["balance"] == 2000


@pytest.mark.parametrize("field", ["id", "user_id"])
@pytest.mark.parametrize("bad", BAD_IDS)
def test_purchase__invalid_id_in_body__422_nothing_changed(api, field, bad):
    api.account("u1", 2000)
    body = {"id": "v1", "user_id": "u1", "service_name": "WhatsApp", "country": "US",
            "cost_cents": 150, field: bad}
    r = api.client.post("/api/v1/verifications", json=body, headers=api.service)
    err = assert_error(r, 422, "validation_error")
    assert any(f["field"] == field for f in err["details"]["fields"])
    assert ledger_state(api, "u1")["balance"] == 2000


@pytest.mark.parametrize("drop", ["user_id", "service_name", "country", "cost_cents"])
def test_purchase__missing_required_field__422(api, drop):
    api.account("u1", 2000)
    body = {"user_id": "u1", "service_name": "WhatsApp", "country": "US", "cost_cents": 150}
    del body[drop]
    r = api.client.post("/api/v1/verifications", json=body, headers=api.service)
    assert_error(r, 422, "validation_error")
    assert ledger_state(api, "u1")["balance"] == 2000


def test_purchase__unknown_field__422(api):
    api.account("u1", 2000)
    assert_error(api.purchase("u1", 150, vid="v1", coupon="FREE"), 422, "validation_error")


# -- verification lifecycle --------------------------------------------------------------

def test_get_verification__200_and_404(api):
    api.account("u1", 2000)
    purchased = api.purchase("u1", 150, vid="v1").get_json()["verification"]
    r = api.client.get("/api/v1/verifications/v1", headers=api.service)
    assert r.status_code == 200
    assert r.get_json() == purchased
    assert_error(api.client.get("/api/v1/verifications/v2", headers=api.service), 404,
                 "not_found")


@pytest.mark.parametrize("bad", BAD_PATH_IDS)
@pytest.mark.parametrize("method,suffix", [("get", ""), ("post", "/complete"),
                                           ("post", "/cancel"), ("post", "/fail")])
def test_verification_routes__bad_id_in_path__422(api, method, suffix, bad):
    r = getattr(api.client, method)(f"/api/v1/verifications/{bad}{suffix}",
                                    headers=api.service)
    err = assert_error(r, 422, "validation_error")
    assert [f["field"] for f in err["details"]["fields"]] == ["verification_id"]


def test_complete__200_then_again_200_and_charge_stands(api):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    first = end(api, "v1", "complete")
    again = end(api, "v1", "complete")
    assert first.status_code == again.status_code == 200
    assert set(first.get_json()) == VERIFICATION_KEYS
    assert first.get_json()["status"] == again.get_json()["status"] == "completed"
    assert first.get_json()["refund_transaction_id"] is None
    assert ledger_state(api, "u1")["balance"] == 1850


@pytest.mark.parametrize("ending", ["cancel", "fail"])
def test_complete__after_cancel_or_fail__409_invalid_state(api, ending):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    assert end(api, "v1", ending).status_code == 200
    assert_error(end(api, "v1", "complete"), 409, "invalid_state")
    r = api.client.get("/api/v1/verifications/v1", headers=api.service)
    assert r.get_json()["status"] == {"cancel": "cancelled", "fail": "failed"}[ending]
    assert ledger_state(api, "u1")["balance"] == 2000


def test_complete__after_timed_out__409_invalid_state(api, app):
    from sqlalchemy import text

    from shared import ledger
    from shared.db import db

    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    with app.app_context():
        # The workers refund only after expires_at: move it into the past first.
        db.session.execute(text("UPDATE verifications SET expires_at = created_at "
                                "WHERE id = 'v1'"))
        db.session.commit()
        ledger.refund_verification(verification_id="v1", status="timed_out")
    assert_error(end(api, "v1", "complete"), 409, "invalid_state")
    assert_error(end(api, "v1", "cancel"), 409, "invalid_state")
    assert ledger_state(api, "u1")["balance"] == 2000


@pytest.mark.parametrize("action", ["complete", "cancel", "fail"])
def test_end_verification__unknown_id__404(api, action):
    assert_error(end(api, "nope", action), 404, "not_found")


def test_cancel__refunds_once(api):
    api.account("u1", 2000)
    charge = api.purchase("u1", 150, vid="v1").get_json()["transaction"]
    first = end(api, "v1", "cancel", reason="user cancelled")
    assert first.status_code == 200
    body = first.get_json()
    assert set(body) == {"verification", "refund"}
    ver, refund = body["verification"], body["refund"]
    assert (ver["status"], ver["refund_transaction_id"], ver["charge_transaction_id"]) == (
        "cancelled", refund["id"], charge["id"])
    assert set(refund) == TX_KEYS
    assert (refund["type"], refund["amount_cents"], refund["verification_id"]) == (
        "verification_refund", 150, "v1")
    assert refund["balance_after_cents"] == 2000

    again = end(api, "v1", "cancel")
    assert again.status_code == 200
    assert again.get_json()["refund"] == refund
    refunds = api.client.get("/api/v1/accounts/u1/transactions", headers=api.service,
                             query_string={"type": "verification_refund"}).get_json()
    assert refunds["total"] == 1
    assert ledger_state(api, "u1")["balance"] == 2000
    assert invariant_violations(api.app) == []


def test_cancel__after_complete__409_no_refund(api):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    end(api, "v1", "complete")
    before = ledger_state(api, "u1")
    assert_error(end(api, "v1", "cancel"), 409, "invalid_state")
    assert_error(end(api, "v1", "fail"), 409, "invalid_state")
    assert ledger_state(api, "u1") == before


def test_fail__refunds_once_with_status_failed(api):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    first = end(api, "v1", "fail", reason="no SMS arrived")
    again = end(api, "v1", "fail")
    assert first.status_code == again.status_code == 200
    assert first.get_json()["verification"]["status"] == "failed"
    assert first.get_json()["refund"]["amount_cents"] == 150
    assert again.get_json()["refund"] == first.get_json()["refund"]
    assert ledger_state(api, "u1")["balance"] == 2000
    assert invariant_violations(api.app) == []


@pytest.mark.parametrize("first,then", [("fail", "cancel"), ("cancel", "fail")])
def test_cancel_and_fail__other_ending_after__409(api, first, then):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    assert end(api, "v1", first).status_code == 200
    before = ledger_state(api, "u1")
    assert_error(end(api, "v1", then), 409, "invalid_state")
    assert ledger_state(api, "u1") == before


@pytest.mark.parametrize("body", [{"reason": "x" * 201}, {"reason": 5}, {"why": "x"}])
def test_cancel__invalid_body__422_no_refund(api, body):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    assert_error(end(api, "v1", "cancel", **body), 422, "validation_error")
    ver = api.client.get("/api/v1/verifications/v1", headers=api.service).get_json()
    assert ver["status"] == "pending"


# -- account transactions (service view of the wallet's "detailed") ---------------------

def test_account_transactions__200_detailed_page_and_unknown_404(api):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    r = api.client.get("/api/v1/accounts/u1/transactions", headers=api.service)
    assert r.status_code == 200
    body = r.get_json()
    assert set(body) == {"total", "transactions", "next_cursor"}
    assert body["total"] == 2 and body["next_cursor"] is None
    assert [t["seq"] for t in body["transactions"]] == [2, 1]
    assert_error(api.client.get("/api/v1/accounts/nobody/transactions", headers=api.service),
                 404, "not_found")


@pytest.mark.parametrize("query", [{"limit": 0}, {"limit": 201}, {"type": "debit"},
                                   {"cursor": "abc"}, {"skip": -1}, {"bogus": 1}])
def test_account_transactions__bad_query__422(api, query):
    api.account("u1", 2000)
    r = api.client.get("/api/v1/accounts/u1/transactions", headers=api.service,
                       query_string=query)
    assert_error(r, 422, "validation_error")


# -- 503 ---------------------------------------------------------------------------------

def test_database_unreachable__503_unavailable(api, monkeypatch):
    from shared import accounts

    def down(**_):
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(accounts, "get", down)
    assert_error(api.client.get("/api/v1/accounts/u1", headers=api.service), 503,
                 "unavailable")


# -- bodies that are not a JSON object ---------------------------------------------------

BODY_ROUTES = [("put", "/api/v1/accounts/u1"), ("post", "/api/v1/accounts/u1/credits"),
               ("post", "/api/v1/accounts/u1/adjustments"), ("post", "/api/v1/verifications"),
               ("post", "/api/v1/verifications/v1/cancel"),
               ("post", "/api/v1/verifications/v1/fail")]


@pytest.mark.parametrize("raw", [b"{not json", b"not json at all", b"[]", b"[{}]", b'"text"',
                                 b"null", b"42", b'{"a": 1} trailing', b"\xff\xfe{"])
@pytest.mark.parametrize("method,path", BODY_ROUTES)
def test_body_not_a_json_object__400_nothing_changed(api, method, path, raw):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    before = ledger_state(api, "u1")
    r = getattr(api.client, method)(path, data=raw, headers={
        **api.service, "Content-Type": "application/json"})
    assert_error(r, 400, "bad_request")
    assert ledger_state(api, "u1") == before


@pytest.mark.parametrize("method,path", BODY_ROUTES[1:4])
def test_required_body_left_out__400(api, method, path):
    api.account("u1", 2000)
    assert_error(getattr(api.client, method)(path, headers=api.service), 400, "bad_request")
    assert ledger_state(api, "u1")["balance"] == 2000


# -- anything else -----------------------------------------------------------------------

def test_unknown_route_and_method__contract_error_body(api):
    assert_error(api.client.get("/api/v1/nothing-here", headers=api.service), 404, "not_found")
    r = api.client.delete("/api/v1/accounts/u1", headers=api.service)
    assert r.status_code == 405
    assert set(r.get_json()["error"]) == {"code", "message", "details"}
