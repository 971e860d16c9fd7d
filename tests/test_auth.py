"""Who may call what (DESIGN.md "HTTP contract"): the service key, user and admin JWTs
(HS256, claims sub/role/exp) and the development token CLI. (429 is in test_rate_limit.py,
log hygiene in test_log_secrets.py.)"""
from datetime import datetime, timedelta, timezone

import jwt
import pytest

from tests.support import assert_error

pytestmark = pytest.mark.smoke

SERVICE_ROUTES = [
    ("put", "/api/v1/accounts/u1"), ("get", "/api/v1/accounts/u1"),
    ("post", "/api/v1/accounts/u1/credits"), ("post", "/api/v1/accounts/u1/adjustments"),
    ("get", "/api/v1/accounts/u1/transactions"), ("post", "/api/v1/verifications"),
    ("get", "/api/v1/verifications/v1"), ("post", "/api/v1/verifications/v1/complete"),
    ("post", "/api/v1/verifications/v1/cancel"), ("post", "/api/v1/verifications/v1/fail")]
USER_ROUTES = [
    ("get", "/api/wallet/balance"), ("get", "/api/wallet/transactions"),
    ("get", "/api/wallet/transactions/detailed"), ("get", "/api/wallet/transactions/export.csv"),
    ("get", "/api/notifications"), ("post", "/api/notifications/1/read"),
    ("post", "/api/notifications/read-all"), ("get", "/api/notifications/preferences"),
    ("put", "/api/notifications/preferences")]
ADMIN_ROUTES = [("get", "/api/admin/transactions/monitor"), ("get", "/api/admin/alerts"),
                ("post", "/api/admin/alerts/1/acknowledge"),
                ("get", "/api/admin/reconciliation")]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def signed(app, claims: dict, *, secret=None, algorithm="HS256") -> str:
    """A JWT minted with PyJWT directly, so each claim can be left out or spoiled."""
    return jwt.encode(claims, secret or app.config["JWT_SECRET"], algorithm=algorithm)


def in_an_hour() -> datetime:
    return datetime.now(timezone.utc) + timedelta(hours=1)


# -- service routes ----------------------------------------------------------------------

@pytest.mark.parametrize("method,path", SERVICE_ROUTES)
def test_service_routes__missing_or_garbage_key__401(api, method, path):
    call = getattr(api.client, method)
    assert_error(call(path, json={}), 401, "unauthorized")
    assert_error(call(path, json={}, headers={"X-API-Key": "garbage"}), 401, "unauthorized")
    assert_error(call(path, json={}, headers={"X-API-Key": ""}), 401, "unauthorized")
    assert_error(call(path, json={}, headers=bearer("garbage")), 401, "unauthorized")


@pytest.mark.parametrize("method,path", SERVICE_ROUTES)
def test_service_routes__user_or_admin_jwt__403(api, method, path):
    call = getattr(api.client, method)
    assert_error(call(path, json={}, headers=api.user("u1")), 403, "forbidden")
    assert_error(call(path, json={}, headers=api.admin()), 403, "forbidden")


def test_service_routes__refused_calls_change_nothing(api):
    api.account("u1", 2000)
    body = {"amount_cents": 500, "payment_id": "p-evil"}
    purchase = {"user_id": "u1", "service_name": "WhatsApp", "country": "US",
                "cost_cents": 150}
    for headers, status in ((api.user("u1"), 403), (api.admin(), 403),
                            ({"X-API-Key": "nope"}, 401), ({}, 401)):
        r = api.client.post("/api/v1/accounts/u1/credits", json=body, headers=headers)
        assert r.status_code == status
        r = api.client.post("/api/v1/verifications", json=purchase, headers=headers)
        assert r.status_code == status
    acct = api.client.get("/api/v1/accounts/u1", headers=api.service).get_json()
    assert (acct["balance_cents"], acct["last_seq"]) == (2000, 1)


def test_service_key__accepted(api):
    r = api.client.put("/api/v1/accounts/u1", headers=api.service, json={})
    assert r.status_code == 201


# -- user routes -------------------------------------------------------------------------

@pytest.mark.parametrize("method,path", USER_ROUTES)
def test_user_routes__no_credentials__401(api, method, path):
    assert_error(getattr(api.client, method)(path, json={}), 401, "unauthorized")


@pytest.mark.parametrize("method,path", USER_ROUTES)
def test_user_routes__service_key__403(api, method, path):
    r = getattr(api.client, method)(path, json={}, headers=api.service)
    assert_error(r, 403, "forbidden")


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_routes__user_jwt__403_admin_jwt__allowed(api, method, path):
    call = getattr(api.client, method)
    assert_error(call(path, json={}, headers=api.user("u1")), 403, "forbidden")
    r = call(path, json={}, headers=api.admin())
    if path.endswith("/acknowledge"):  # past the role check: there is no alert 1
        assert_error(r, 404, "not_found")
    else:
        assert r.status_code == 200, r.get_json()


def test_user_jwt__valid_token_reads_own_wallet(api):
    api.account("u1", 2000)
    r = api.client.get("/api/wallet/balance", headers=api.user("u1"))
    assert r.status_code == 200
    assert r.get_json()["balance_cents"] == 2000


# -- tokens ------------------------------------------------------------------------------

def test_jwt__expired__401(api):
    api.account("u1", 2000)
    token = api.token("u1", ttl=timedelta(seconds=-5))
    assert_error(api.client.get("/api/wallet/balance", headers=bearer(token)), 401,
                 "unauthorized")
    admin = api.token("admin-1", admin=True, ttl=timedelta(seconds=-5))
    assert_error(api.client.get("/api/admin/alerts", headers=bearer(admin)), 401,
                 "unauthorized")


def test_jwt__signed_with_another_secret__401(api, app):
    api.account("u1", 2000)
    for role in ("user", "admin"):
        token = signed(app, {"sub": "u1", "role": role, "exp": in_an_hour()},
                       secret="some-other-secret-0123456789abcdef")
        for path in ("/api/wallet/balance", "/api/admin/alerts"):
            assert_error(api.client.get(path, headers=bearer(token)), 401, "unauthorized")


@pytest.mark.parametrize("claims", [
    {"sub": "u1", "role": "user"},                          # no exp
    {"role": "user", "exp": "EXP"},                         # no sub
    {"sub": "", "role": "user", "exp": "EXP"},              # empty sub
    {"sub": 42, "role": "user", "exp": "EXP"},              # sub not a string
    {"sub": "x" * 65, "role": "user", "exp": "EXP"},        # sub longer than a user id
    {"sub": "u1", "role": "root", "exp": "EXP"},            # unknown role
    {"sub": "u1", "role": "user", "exp": "tomorrow"},       # exp not a time
], ids=["no-exp", "no-sub", "empty-sub", "int-sub", "long-sub", "bad-role", "bad-exp"])
def test_jwt__bad_claims__401(api, app, claims):
    api.account("u1", 2000)
    token = signed(app, {k: (in_an_hour() if v == "EXP" else v) for k, v in claims.items()})
    assert_error(api.client.get("/api/wallet/balance", headers=bearer(token)), 401,
                 "unauthorized")


def test_jwt__sub_outside_the_id_alphabet__401(api, app):
    token = signed(app, {"sub": "u1 OR 1=1", "role": "user", "exp": in_an_hour()})
    assert_error(api.client.get("/api/notifications/preferences", headers=bearer(token)), 401,
                 "unauthorized")


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("algorithm", ["HS512", "none"])
def test_jwt__other_algorithm__401(api, app, algorithm):
    api.account("u1", 2000)
    claims = {"sub": "u1", "role": "admin", "exp": in_an_hour()}
    token = jwt.encode(claims, None if algorithm == "none" else app.config["JWT_SECRET"],
                       algorithm=algorithm)
    assert_error(api.client.get("/api/wallet/balance", headers=bearer(token)), 401,
                 "unauthorized")
    assert_error(api.client.get("/api/admin/alerts", headers=bearer(token)), 401,
                 "unauthorized")


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Basic dTE6cGFzcw==", "Token abc",
                                    "Bearer not.a.jwt", "Bearer a b c"])
def test_authorization_header__malformed__401(api, header):
    api.account("u1", 2000)
    r = api.client.get("/api/wallet/balance", headers={"Authorization": header})
    assert_error(r, 401, "unauthorized")


def test_jwt__role_claim_decides_admin_not_the_sub(api, app):
    token = signed(app, {"sub": "admin-1", "role": "user", "exp": in_an_hour()})
    assert_error(api.client.get("/api/admin/alerts", headers=bearer(token)), 403, "forbidden")
    admin = signed(app, {"sub": "ops-7", "role": "admin", "exp": in_an_hour()})
    assert api.client.get("/api/admin/alerts", headers=bearer(admin)).status_code == 200


# -- development CLI ---------------------------------------------------------------------

def test_cli_token__prints_a_user_token_that_works(api, app):
    api.account("u1", 2000)
    result = app.test_cli_runner().invoke(args=["token", "u1"])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    claims = jwt.decode(token, app.config["JWT_SECRET"], algorithms=["HS256"])
    assert (claims["sub"], claims["role"]) == ("u1", "user") and "exp" in claims
    r = api.client.get("/api/wallet/balance", headers=bearer(token))
    assert r.status_code == 200 and r.get_json()["balance_cents"] == 2000
    assert_error(api.client.get("/api/admin/alerts", headers=bearer(token)), 403, "forbidden")


def test_cli_token__admin_flag_prints_an_admin_token(api, app):
    result = app.test_cli_runner().invoke(args=["token", "ops-1", "--admin"])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert jwt.decode(token, app.config["JWT_SECRET"], algorithms=["HS256"])["role"] == "admin"
    r = api.client.get("/api/admin/transactions/monitor", headers=bearer(token))
    assert r.status_code == 200 and r.get_json()["window_minutes"] == 60
