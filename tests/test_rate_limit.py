"""429 rate_limited on user routes (Flask-Limiter, per credential)."""
import pytest

pytestmark = pytest.mark.smoke


@pytest.fixture
def low_limit(app):
    old = app.config["RATELIMIT_USER"]
    app.config["RATELIMIT_USER"] = "3/minute"
    from api_service import limiter

    limiter.reset()
    yield
    app.config["RATELIMIT_USER"] = old
    limiter.reset()


def test_wallet__too_many_requests_gets_429_with_error_body(api, low_limit):
    api.account("rl-user", 100)
    headers = api.user("rl-user")
    codes = [api.client.get("/api/wallet/balance", headers=headers).status_code
             for _ in range(5)]
    assert codes[:3] == [200, 200, 200]
    assert codes[3:] == [429, 429]
    body = api.client.get("/api/wallet/balance", headers=headers).get_json()
    assert body["error"]["code"] == "rate_limited"
    # Another user has a bucket of their own.
    api.account("rl-other", 100)
    assert api.client.get("/api/wallet/balance",
                          headers=api.user("rl-other")).status_code == 200


def test_service_routes__are_not_rate_limited_per_user(api, low_limit):
    api.account("rl-svc", 1000)
    codes = {api.client.get("/api/v1/accounts/rl-svc", headers=api.service).status_code
             for _ in range(6)}
    assert codes == {200}
