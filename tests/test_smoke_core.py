"""A first walk through the purchase lifecycle (runs on Postgres and SQLite)."""
import pytest

from tests.support import invariant_violations

pytestmark = pytest.mark.smoke


def test_purchase_cancel__refunds_once_and_keeps_invariants(api, app):
    api.account("u1", 2000)
    r = api.purchase("u1", 150, vid="v1")
    assert r.status_code == 201
    assert r.get_json()["balance_cents"] == 1850
    first = api.client.post("/api/v1/verifications/v1/cancel", json={}, headers=api.service)
    again = api.client.post("/api/v1/verifications/v1/cancel", headers=api.service)
    assert first.status_code == again.status_code == 200
    assert first.get_json()["refund"] == again.get_json()["refund"]
    assert first.get_json()["refund"]["balance_after_cents"] == 2000
    assert invariant_violations(app) == []
