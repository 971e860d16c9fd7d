"""Bad input is refused with a clear error and changes nothing: text fields, email, query
integers and dates, JWT lifetime and issuer/audience, rate limits per verified principal."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import jwt
import pytest
from sqlalchemy import func, select

from shared.db import db
from shared.models import Account, Transaction, Verification
from tests.support.api import assert_error

FORGED = "wa\nAuto-refund processed: Verification=v1, Amount=999999999"
CONTROL = [FORGED, "a\rb", "a\x00b", "a\x1bb", "a\x7fb", "a\x85b", "a\u2028b", "a\u2029b"]


def _counts(app) -> tuple:
    with app.app_context():
        return tuple(db.session.scalar(select(func.count()).select_from(m))
                     for m in (Account, Transaction, Verification))


def _field_named(err: dict, field: str) -> None:
    assert any(f["field"] == field for f in err["details"]["fields"]), err


@pytest.mark.parametrize("text", CONTROL)
def test_text_fields__refuse_control_characters_and_write_nothing(api, app, text):
    api.account("ctl-user", 1_000)
    vid = api.purchase("ctl-user", vid="ctl-v1").get_json()["verification"]["id"]
    before = _counts(app)
    calls = [
        ("service_name", lambda: api.purchase("ctl-user", vid="ctl-v2", service_name=text)),
        ("country", lambda: api.purchase("ctl-user", vid="ctl-v3", country=text)),
        ("description", lambda: api.client.post(
            "/api/v1/accounts/ctl-user/credits", headers=api.service,
            json={"amount_cents": 5, "payment_id": "p-ctl", "description": text})),
        ("reason", lambda: api.client.post(
            "/api/v1/accounts/ctl-user/adjustments", headers=api.service,
            json={"amount_cents": 5, "reason": text, "idempotency_key": "k-ctl"})),
        ("reason", lambda: api.client.post(f"/api/v1/verifications/{vid}/cancel",
                                           headers=api.service, json={"reason": text})),
        ("display_name", lambda: api.client.put("/api/v1/accounts/ctl-new", headers=api.service,
                                                json={"display_name": text})),
        ("note", lambda: api.client.post("/api/admin/alerts/1/acknowledge", headers=api.admin(),
                                         json={"note": text})),
    ]
    for field, call in calls:
        _field_named(assert_error(call(), 422, "validation_error"), field)
    assert _counts(app) == before
    status = api.client.get(f"/api/v1/verifications/{vid}", headers=api.service).get_json()
    assert status["status"] == "pending"


def test_text_fields__ordinary_unicode_is_kept(api):
    api.account("uni-user", 1_000)
    r = api.purchase("uni-user", service_name="Télégram ✓", country="Côte d'Ivoire")
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["verification"]["service_name"] == "Télégram ✓"


@pytest.mark.parametrize("body", [b"\t", b" ", b"\r\n", b"null", b"[]"])
def test_optional_only_body__whitespace_or_not_an_object__400_and_nothing_changes(api, body):
    """Only an absent body means "no fields"; whitespace is not a JSON document."""
    user = api.user("prefs-ws")
    before = api.client.get("/api/notifications/preferences", headers=user).get_json()
    r = api.client.put("/api/notifications/preferences", data=body,
                       headers={**user, "Content-Type": "application/json"})
    assert_error(r, 400, "bad_request")
    assert api.client.get("/api/notifications/preferences", headers=user).get_json() == before


@pytest.mark.parametrize("email", ["victim@example.test,attacker@evil.example",
                                   "victim@example.test attacker@evil.example",
                                   "victim@example.test\nBcc: attacker@evil.example",
                                   "<victim@example.test>", "no-at-sign", "a@b@c.example"])
def test_email__exactly_one_address(api, app, email):
    before = _counts(app)
    r = api.client.put("/api/v1/accounts/mail-user", headers=api.service, json={"email": email})
    _field_named(assert_error(r, 422, "validation_error"), "email")
    assert _counts(app) == before


def test_email__one_address_is_accepted(api):
    r = api.client.put("/api/v1/accounts/mail-ok", headers=api.service,
                       json={"email": "someone@example.test"})
    assert r.status_code == 201 and r.get_json()["email"] == "someone@example.test"


ODD_INTEGERS = ["\u00b2", "\u0661\u0662", "1" * 19, "-1", " 5", "5 ", "+5", "0x10", "1e2"]


@pytest.mark.parametrize("value", ODD_INTEGERS)
def test_query_integers__only_ascii_digits__422(api, value):
    api.account("q-user", 100)
    user = api.user("q-user")
    for url, field, headers in (
            ("/api/wallet/transactions?skip={}", "skip", user),
            ("/api/wallet/transactions?limit={}", "limit", user),
            ("/api/wallet/transactions/detailed?cursor={}", "cursor", user),
            ("/api/wallet/transactions/detailed?skip={}", "skip", user),
            ("/api/notifications?limit={}", "limit", user),
            ("/api/notifications?cursor={}", "cursor", user),
            ("/api/admin/transactions/monitor?minutes={}", "minutes", api.admin()),
            ("/api/admin/alerts?limit={}", "limit", api.admin())):
        r = api.client.get(url.format(value), headers=headers)
        _field_named(assert_error(r, 422, "validation_error"), field)


EDGES = {  # a bound -> does it keep the one transaction (made now)?
    ("start_date", "0001-01-01T00:00:00+14:00"): True,  # year 0 in UTC: the earliest
    ("end_date", "0001-01-01T00:00:00+14:00"): False,
    ("start_date", "9999-12-31T23:59:59-14:00"): False,  # year 10000 in UTC: the latest
    ("end_date", "9999-12-31T23:59:59-14:00"): True,
    ("start_date", "9999-12-31T23:30:00Z"): False,  # in the last hour UTC holds
    ("end_date", "9999-12-31T23:59:59.999999Z"): True,
    ("start_date", "0001-01-01T00:00:00Z"): True,
}


@pytest.mark.smoke
@pytest.mark.parametrize("rolled_up", [False, True])
def test_dates_at_and_past_the_ends_of_utc__bounds_like_the_nearest_on_every_database(
        api, app, rolled_up):
    """A valid date-time outside what UTC holds bounds like the nearest one it holds; the
    last hour of year 9999 counts through the hourly roll-ups without running past it."""
    from shared import rollups

    api.account("d-user", 100)
    if rolled_up:
        with app.app_context():
            assert rollups.catch_up()["watermark_id"] > 0
    for (name, date), kept in EDGES.items():
        for path in ("/api/wallet/transactions/detailed", "/api/wallet/transactions/export.csv"):
            r = api.client.get(path, query_string={name: date}, headers=api.user("d-user"))
            assert r.status_code == 200, (name, date, r.get_data(as_text=True))
            if path.endswith(".csv"):
                assert len(r.get_data(as_text=True).splitlines()) == 1 + kept, (name, date)
            else:
                body = r.get_json()
                assert (body["total"], len(body["transactions"])) == (kept, kept), (name, date)


# -- JWT -------------------------------------------------------------------------------------

def _token(app, **claims) -> str:
    now = datetime.now(timezone.utc)
    body = {"sub": "jwt-user", "role": "user", "iat": now, "exp": now + timedelta(hours=1),
            **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, app.config["JWT_SECRET"], algorithm="HS256")


def _balance(api, token):
    return api.client.get("/api/wallet/balance", headers={"Authorization": f"Bearer {token}"})


def test_jwt__lifetime_over_the_bound__401(api, app):
    api.account("jwt-user", 10)
    now = datetime.now(timezone.utc)
    assert app.config["JWT_MAX_TTL_S"] == 86400
    assert _balance(api, _token(app, exp=now + timedelta(hours=23))).status_code == 200
    assert_error(_balance(api, _token(app, exp=now + timedelta(days=2))), 401, "unauthorized")
    # Without iat, exp is bounded from now.
    assert _balance(api, _token(app, iat=None, exp=now + timedelta(hours=2))).status_code == 200
    assert_error(_balance(api, _token(app, iat=None, exp=now + timedelta(days=365))),
                 401, "unauthorized")


@pytest.fixture
def iss_aud(app):
    app.config.update(JWT_ISSUER="main-app", JWT_AUDIENCE="txmon")
    yield
    app.config.update(JWT_ISSUER=None, JWT_AUDIENCE=None)


def test_jwt__issuer_and_audience_required_when_configured(api, app, iss_aud):
    api.account("jwt-user", 10)
    assert _balance(api, _token(app, iss="main-app", aud="txmon")).status_code == 200
    for claims in ({}, {"iss": "main-app"}, {"aud": "txmon"}, {"iss": "other", "aud": "txmon"},
                   {"iss": "main-app", "aud": "other"}):
        assert_error(_balance(api, _token(app, **claims)), 401, "unauthorized")
    assert _balance(api, api.token("jwt-user")).status_code == 200  # the minter adds both


# -- rate limits -----------------------------------------------------------------------------

@pytest.fixture
def limits(app):
    from api_service import limiter

    old = app.config["RATELIMIT_USER"], app.config["RATELIMIT_AUTH_FAILURES"]
    app.config.update(RATELIMIT_USER="4/minute", RATELIMIT_AUTH_FAILURES="3/minute")
    limiter.reset()
    yield
    app.config["RATELIMIT_USER"], app.config["RATELIMIT_AUTH_FAILURES"] = old
    limiter.reset()


def test_rate_limit__header_spellings_share_one_bucket(api, limits):
    api.account("rl-spell", 10)
    token = api.token("rl-spell")
    spellings = [f"Bearer {token}", f"bearer {token}", f"BEARER {token}", f"Bearer  {token}",
                 f"Bearer {token} "]
    codes = [api.client.get("/api/wallet/balance", headers={"Authorization": h}).status_code
             for h in spellings]
    assert codes == [200, 200, 200, 200, 429]


def test_rate_limit__failed_api_key_guesses_limited_per_address(api, app, limits):
    api.account("rl-key", 10)
    attacker = {"REMOTE_ADDR": "198.51.100.7"}
    codes = [api.client.get("/api/v1/accounts/rl-key", headers={"X-API-Key": f"guess-{i}"},
                            environ_base=attacker).status_code for i in range(5)]
    assert codes == [401, 401, 401, 429, 429]
    # Blocked before any check: even the right key from that address learns nothing.
    r = api.client.get("/api/v1/accounts/rl-key", headers=api.service, environ_base=attacker)
    assert_error(r, 429, "rate_limited")
    r = api.client.get("/api/v1/accounts/rl-key", headers=api.service,
                       environ_base={"REMOTE_ADDR": "198.51.100.8"})
    assert r.status_code == 200


def test_rate_limit__bad_jwts_limited_per_address(api, limits):
    attacker = {"REMOTE_ADDR": "198.51.100.9"}
    codes = [api.client.get("/api/wallet/balance", environ_base=attacker,
                            headers={"Authorization": f"Bearer forged-{i}"}).status_code
             for i in range(5)]
    assert codes == [401, 401, 401, 429, 429]
