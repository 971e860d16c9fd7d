"""Helpers shared by the tests: auth headers, account set-up, invariant checks."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text


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


def invariant_violations(app) -> list[str]:
    """Every breach of DESIGN.md's ledger invariants 1-6 in the whole database."""
    from shared import reconcile
    from shared.db import db

    problems = []
    with app.app_context(), db.engine.connect() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT user_id FROM accounts"))]
        for start in range(0, len(ids), 500):
            problems += [f"{m['user_id']}: {m['problems']}"
                         for m in reconcile.check_accounts(conn, ids[start:start + 500])]
        checks = {
            "negative balance without adjustment":
                "SELECT a.user_id FROM accounts a WHERE a.balance_cents < 0 AND NOT EXISTS "
                "(SELECT 1 FROM transactions t WHERE t.user_id = a.user_id "
                "AND t.type = 'adjustment' AND t.amount_cents < 0)",
            "transaction without exactly one notification":
                "SELECT t.id FROM transactions t LEFT JOIN notifications n "
                "ON n.transaction_id = t.id GROUP BY t.id HAVING COUNT(n.id) <> 1",
            "charged verification without its charge":
                "SELECT v.id FROM verifications v LEFT JOIN transactions t "
                "ON t.id = v.charge_transaction_id WHERE t.id IS NULL "
                "OR t.type <> 'sms_purchase' OR t.amount_cents <> -v.cost_cents",
            "refund of a completed or pending verification":
                "SELECT v.id FROM verifications v WHERE v.refund_transaction_id IS NOT NULL "
                "AND v.status NOT IN ('cancelled', 'failed', 'timed_out')",
            "ended verification without refund":
                "SELECT v.id FROM verifications v WHERE v.refund_transaction_id IS NULL "
                "AND v.status IN ('cancelled', 'failed', 'timed_out')",
            "more than one charge or refund":
                "SELECT verification_id FROM transactions WHERE verification_id IS NOT NULL "
                "GROUP BY verification_id, type HAVING COUNT(*) > 1",
            "payment credited twice":
                "SELECT reference FROM transactions WHERE type = 'credit' "
                "GROUP BY reference HAVING COUNT(*) > 1",
        }
        for name, sql in checks.items():
            bad = conn.execute(text(sql)).fetchall()
            if bad:
                problems.append(f"{name}: {[r[0] for r in bad][:10]}")
    return problems


def assert_error(r, status: int, code: str) -> dict:
    """The contract's error body: {"error": {"code", "message", "details"}}."""
    assert r.status_code == status, r.get_json()
    body = r.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code and body["error"]["message"]
    if status == 422:
        assert body["error"]["details"]["fields"]
    return body["error"]
