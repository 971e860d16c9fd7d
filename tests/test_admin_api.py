"""Admin and operations contract (DESIGN.md "Admin", "Operations"): the transaction
monitor, alerts, reconciliation, health, metrics and the OpenAPI document."""
import re
from datetime import datetime, timedelta, timezone

import pytest

from tests.support import assert_error
from sqlalchemy import text, update

pytestmark = pytest.mark.smoke

ALERT_KEYS = {"id", "user_id", "rule", "transaction_id", "details", "status", "created_at",
              "acknowledged_at", "note"}
# Changes with issue 14, "Read side at scale: history, monitor, timeline and CSV cost
# the same on a million rows":
# DESIGN.md adds the monitor's `series`.
MONITOR_KEYS = {"window_minutes", "total_transactions", "credits_added_cents",
                "credits_spent_cents", "refunds_issued_cents", "unique_users", "by_type",
                "recent_transactions", "series", "bucket_minutes"}


def monitor(api, **query):
    return api.client.get("/api/admin/transactions/monitor", headers=api.admin(),
                          query_string=query)


def raise_alerts(app, *specs) -> list[int]:
    """Create alerts through the service, the way the workers do."""
    from shared import alerts

    with app.app_context():
        return [alerts.raise_alert(rule=rule, user_id=uid, details={"n": i},
                                   dedup_key=f"test:{i}")[0]
                for i, (rule, uid) in enumerate(specs)]


# -- monitor -----------------------------------------------------------------------------

def test_monitor__totals_by_type_and_users(api):
    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    api.purchase("u1", 300, vid="v2")
    api.client.post("/api/v1/verifications/v1/cancel", headers=api.service)
    api.account("u2", 500)
    api.client.post("/api/v1/accounts/u2/adjustments", headers=api.service,
                    json={"amount_cents": -100, "reason": "fee", "idempotency_key": "a1"})
    api.account("u3")  # no transactions: not a user in the window
    r = monitor(api)
    assert r.status_code == 200
    body = r.get_json()
    assert set(body) == MONITOR_KEYS
    assert body["window_minutes"] == 60
    assert body["total_transactions"] == 6
    assert body["credits_added_cents"] == 2500
    assert body["credits_spent_cents"] == 450
    assert body["refunds_issued_cents"] == 150
    assert body["unique_users"] == 2
    assert body["by_type"] == {"credit": 2, "sms_purchase": 2, "verification_refund": 1,
                               "adjustment": 1}
    recent = body["recent_transactions"]
    assert len(recent) == 6
    assert recent[0]["type"] == "adjustment" and recent[0]["user_id"] == "u2"
    assert {"id", "user_id", "amount_cents", "type", "created_at"} <= set(recent[0])


def test_monitor__empty_window(api):
    body = monitor(api).get_json()
    assert (body["total_transactions"], body["credits_added_cents"], body["unique_users"]) == (
        0, 0, 0)
    assert body["by_type"] == {} and body["recent_transactions"] == []


def test_monitor__recent_transactions_are_the_newest_20(api):
    api.account("u1")
    ids = [api.client.post("/api/v1/accounts/u1/credits", headers=api.service,
                           json={"amount_cents": 100, "payment_id": f"p{i}"}
                           ).get_json()["transaction"]["id"] for i in range(25)]
    body = monitor(api).get_json()
    assert body["total_transactions"] == 25
    assert body["credits_added_cents"] == 2500
    assert [t["id"] for t in body["recent_transactions"]] == list(reversed(ids))[:20]


def test_monitor__window_excludes_older_transactions(api, app):
    api.account("u1", 2000)
    api.account("u2", 700)
    from shared.db import db
    from shared.models import Transaction

    old = datetime.now(timezone.utc) - timedelta(hours=2)
    with app.app_context(), db.engine.begin() as conn:
        conn.execute(update(Transaction.__table__).where(Transaction.user_id == "u1")
                     .values(created_at=old))
    hour = monitor(api, minutes=60).get_json()
    assert (hour["total_transactions"], hour["credits_added_cents"], hour["unique_users"]) == (
        1, 700, 1)
    day = monitor(api, minutes=1440).get_json()
    assert (day["total_transactions"], day["credits_added_cents"], day["window_minutes"]) == (
        2, 2700, 1440)


@pytest.mark.parametrize("minutes,ok", [(0, False), (1, True), (10080, True), (10081, False),
                                        (-5, False), ("hour", False), ("1.5", False)])
def test_monitor__minutes_bounds(api, minutes, ok):
    r = monitor(api, minutes=minutes)
    if ok:
        assert r.status_code == 200
        assert r.get_json()["window_minutes"] == minutes
    else:
        err = assert_error(r, 422, "validation_error")
        assert any(f["field"] == "minutes" for f in err["details"]["fields"])


# -- alerts ------------------------------------------------------------------------------

def test_alerts__listed_newest_first(api, app):
    first, second = raise_alerts(app, ("large_debit", "u1"), ("rapid_purchases", "u2"))
    r = api.client.get("/api/admin/alerts", headers=api.admin())
    assert r.status_code == 200
    alerts = r.get_json()["alerts"]
    assert [a["id"] for a in alerts] == [second, first]
    assert all(set(a) == ALERT_KEYS for a in alerts)
    assert (alerts[1]["rule"], alerts[1]["user_id"], alerts[1]["status"]) == (
        "large_debit", "u1", "open")
    assert alerts[1]["details"] == {"n": 0}
    assert alerts[1]["acknowledged_at"] is None and alerts[1]["note"] is None


def test_alerts__acknowledge_then_filter_by_status(api, app):
    first, second = raise_alerts(app, ("large_debit", "u1"), ("rapid_purchases", "u2"))
    r = api.client.post(f"/api/admin/alerts/{first}/acknowledge", headers=api.admin(),
                        json={"note": "called the user"})
    assert r.status_code == 200
    alert = r.get_json()
    assert set(alert) == ALERT_KEYS
    assert (alert["id"], alert["status"], alert["note"]) == (first, "acknowledged",
                                                             "called the user")
    assert datetime.fromisoformat(alert["acknowledged_at"]).tzinfo is not None

    def ids(status):
        r = api.client.get("/api/admin/alerts", headers=api.admin(),
                           query_string={"status": status})
        return [a["id"] for a in r.get_json()["alerts"]]

    assert ids("open") == [second]
    assert ids("acknowledged") == [first]


def test_alerts__acknowledge_again_keeps_first_time(api, app):
    [alert_id] = raise_alerts(app, ("large_debit", "u1"))
    url = f"/api/admin/alerts/{alert_id}/acknowledge"
    first = api.client.post(url, headers=api.admin()).get_json()
    again = api.client.post(url, headers=api.admin(), json={"note": "later"})
    assert again.status_code == 200
    assert again.get_json()["acknowledged_at"] == first["acknowledged_at"]
    assert again.get_json()["note"] == "later"


@pytest.mark.parametrize("alert_id", [424242, 0, 2 ** 63, 10 ** 30])
def test_alerts__acknowledge_unknown__404(api, alert_id):
    r = api.client.post(f"/api/admin/alerts/{alert_id}/acknowledge", headers=api.admin())
    assert_error(r, 404, "not_found")


@pytest.mark.parametrize("body", [{"note": "x" * 501}, {"note": 5}, {"comment": "x"}])
def test_alerts__acknowledge_invalid_body__422_stays_open(api, app, body):
    [alert_id] = raise_alerts(app, ("large_debit", "u1"))
    r = api.client.post(f"/api/admin/alerts/{alert_id}/acknowledge", headers=api.admin(),
                        json=body)
    assert_error(r, 422, "validation_error")
    alerts = api.client.get("/api/admin/alerts", headers=api.admin()).get_json()["alerts"]
    assert alerts[0]["status"] == "open"


def test_alerts__acknowledge_malformed_json__400(api, app):
    [alert_id] = raise_alerts(app, ("large_debit", "u1"))
    r = api.client.post(f"/api/admin/alerts/{alert_id}/acknowledge", data=b"[",
                        headers={**api.admin(), "Content-Type": "application/json"})
    assert_error(r, 400, "bad_request")


@pytest.mark.parametrize("limit,ok", [(0, False), (1, True), (200, True), (201, False)])
def test_alerts__limit_bounds(api, app, limit, ok):
    raise_alerts(app, ("large_debit", "u1"), ("large_debit", "u2"))
    r = api.client.get("/api/admin/alerts", headers=api.admin(), query_string={"limit": limit})
    if ok:
        assert r.status_code == 200
        assert len(r.get_json()["alerts"]) == min(limit, 2)
    else:
        assert_error(r, 422, "validation_error")


@pytest.mark.parametrize("status", ["closed", "OPEN", ""])
def test_alerts__unknown_status__422(api, status):
    r = api.client.get("/api/admin/alerts", headers=api.admin(), query_string={"status": status})
    err = assert_error(r, 422, "validation_error")
    assert any(f["field"] == "status" for f in err["details"]["fields"])


# -- reconciliation ----------------------------------------------------------------------

def test_reconciliation__empty_before_any_run(api):
    r = api.client.get("/api/admin/reconciliation", headers=api.admin())
    assert r.status_code == 200
    assert r.get_json() == {"ran_at": None, "accounts_checked": 0, "mismatches": []}


def test_reconciliation__shows_last_run(api, app):
    from shared import reconcile

    api.account("u1", 2000)
    api.purchase("u1", 150, vid="v1")
    api.account("u2", 500)
    api.account("u3")
    with app.app_context():
        reconcile.run()
    body = api.client.get("/api/admin/reconciliation", headers=api.admin()).get_json()
    assert (body["accounts_checked"], body["mismatches"]) == (3, [])
    assert datetime.fromisoformat(body["ran_at"]).tzinfo is not None


def test_reconciliation__reports_and_alerts_on_a_tampered_balance(api, app):
    from shared import reconcile
    from shared.db import db

    api.account("u1", 2000)
    api.account("u2", 500)
    with app.app_context():
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE accounts SET balance_cents = 9999 WHERE user_id = 'u1'"))
        reconcile.run()
    body = api.client.get("/api/admin/reconciliation", headers=api.admin()).get_json()
    assert body["accounts_checked"] == 2
    assert [m["user_id"] for m in body["mismatches"]] == ["u1"]
    alerts = api.client.get("/api/admin/alerts", headers=api.admin()).get_json()["alerts"]
    assert [(a["rule"], a["user_id"]) for a in alerts] == [("reconciliation_mismatch", "u1")]


# -- who may call ------------------------------------------------------------------------

ADMIN_ROUTES = [("get", "/api/admin/transactions/monitor"), ("get", "/api/admin/alerts"),
                ("post", "/api/admin/alerts/1/acknowledge"),
                ("get", "/api/admin/reconciliation")]


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_routes__user_token_or_service_key__403(api, method, path):
    call = getattr(api.client, method)
    assert_error(call(path, headers=api.user("u1")), 403, "forbidden")
    assert_error(call(path, headers=api.service), 403, "forbidden")
    assert_error(call(path), 401, "unauthorized")


# -- operations --------------------------------------------------------------------------

def test_healthz__200(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.get_json()["status"] == "ok"


def test_readyz__200_when_database_and_redis_answer(client):
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.get_json()["checks"] == {"database": "ok", "redis": "ok"}


def test_readyz__503_when_redis_is_unreachable(client, app, monkeypatch):
    monkeypatch.setitem(app.config, "REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.delitem(app.extensions, "txmon_readiness", raising=False)  # no cached check
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.get_json()["checks"]["database"] == "ok"
    assert r.get_json()["checks"]["redis"] != "ok"


def test_metrics__counts_transactions(api):
    def credits_counted() -> float:
        text_ = api.client.get("/metrics").get_data(as_text=True)
        m = re.search(r'^transactions_total\{(?=[^}]*type="credit")(?=[^}]*status="completed")'
                      r'[^}]*\} (\S+)$', text_, re.M)
        assert m, "transactions_total{type=credit,status=completed} missing"
        return float(m.group(1))

    api.account("u0", 2000)
    assert api.purchase("u0", 150, vid="m-v1").status_code == 201
    assert api.client.post("/api/v1/verifications/m-v1/cancel", json={},
                           headers=api.service).status_code == 200
    r = api.client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    exposition = r.get_data(as_text=True)
    # A sample line, not only the HELP/TYPE lines a metric has before its first sample.
    for name in ("transactions_total", "refund_latency_seconds_count"):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? \S+$", exposition, re.M), name
    # Deliveries run in the worker; tests/test_worker_email.py reads its samples there.
    assert "# TYPE notifications_total counter" in exposition
    before = credits_counted()
    api.account("u1", 2000)
    assert credits_counted() == before + 1


CONTRACT_ROUTES = [
    ("put", "/api/v1/accounts/{}"), ("get", "/api/v1/accounts/{}"),
    ("post", "/api/v1/accounts/{}/credits"), ("post", "/api/v1/accounts/{}/adjustments"),
    ("get", "/api/v1/accounts/{}/transactions"), ("post", "/api/v1/verifications"),
    ("get", "/api/v1/verifications/{}"), ("post", "/api/v1/verifications/{}/complete"),
    ("post", "/api/v1/verifications/{}/cancel"), ("post", "/api/v1/verifications/{}/fail"),
    ("get", "/api/wallet/balance"), ("get", "/api/wallet/transactions"),
    ("get", "/api/wallet/transactions/detailed"), ("get", "/api/wallet/transactions/export.csv"),
    ("get", "/api/notifications"), ("post", "/api/notifications/{}/read"),
    ("post", "/api/notifications/read-all"), ("get", "/api/notifications/preferences"),
    ("put", "/api/notifications/preferences"), ("get", "/api/admin/transactions/monitor"),
    ("get", "/api/admin/alerts"), ("post", "/api/admin/alerts/{}/acknowledge"),
    ("get", "/api/admin/reconciliation"), ("get", "/healthz"), ("get", "/readyz")]


def test_openapi__documents_every_contract_route(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.get_json()
    assert doc["openapi"].startswith("3.")
    documented = {(method, re.sub(r"\{[^}]+\}", "{}", path))
                  for path, ops in doc["paths"].items() for method in ops}
    missing = [route for route in CONTRACT_ROUTES if route not in documented]
    assert missing == []


def test_openapi__documents_error_statuses(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    purchase = paths["/api/v1/verifications"]["post"]["responses"]
    assert {"201", "200", "400", "401", "402", "403", "409", "422"} <= set(purchase)
    assert "404" in paths["/api/v1/accounts/{user_id}"]["get"]["responses"]
