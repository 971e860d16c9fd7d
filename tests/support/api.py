"""Calling the app as its clients do, and checking the contract's answers."""
from __future__ import annotations

from datetime import timedelta


class Api:
    """Calls the app the way the main app, a user and an admin do."""

    def __init__(self, app, client):
        self.app, self.client = app, client

    @property
    def service(self) -> dict:
        return {"X-API-Key": self.app.config["SERVICE_KEYS"][0]}

    def token(self, user_id: str, *, admin: bool = False, ttl=timedelta(hours=1)) -> str:
        from api_service.auth import mint_token

        with self.app.app_context():
            return mint_token(user_id, admin=admin, ttl=ttl)

    def user(self, user_id: str) -> dict:
        return {"Authorization": f"Bearer {self.token(user_id)}"}

    def admin(self, user_id: str = "admin-1") -> dict:
        return {"Authorization": f"Bearer {self.token(user_id, admin=True)}"}

    def account(self, user_id: str, balance_cents: int = 0, **fields) -> dict:
        """Create an account and top it up to ``balance_cents`` with one credit."""
        r = self.client.put(f"/api/v1/accounts/{user_id}", json=fields, headers=self.service)
        assert r.status_code in (200, 201), r.get_json()
        if balance_cents:
            r = self.client.post(f"/api/v1/accounts/{user_id}/credits", headers=self.service,
                                 json={"amount_cents": balance_cents,
                                       "payment_id": f"seed-{user_id}"})
            assert r.status_code == 201, r.get_json()
        return r.get_json()

    def purchase(self, user_id: str, cost_cents: int = 150, vid: str | None = None, **extra):
        body = {"user_id": user_id, "service_name": "WhatsApp", "country": "US",
                "cost_cents": cost_cents, **extra}
        if vid:
            body["id"] = vid
        return self.client.post("/api/v1/verifications", json=body, headers=self.service)


def assert_error(r, status: int, code: str) -> dict:
    """The contract's error body: {"error": {"code", "message", "details"}}."""
    assert r.status_code == status, r.get_json()
    body = r.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    if status == 422:
        assert isinstance(body["error"]["details"]["fields"], list)
        assert body["error"]["details"]["fields"]
    return body["error"]


def ok(r, *codes):
    """The JSON body of a response whose status is one of ``codes`` (default 200, 201)."""
    assert r.status_code in (codes or (200, 201)), (r.status_code, r.get_json())
    return r.get_json()
