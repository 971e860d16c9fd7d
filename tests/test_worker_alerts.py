"""Suspicious-activity alerts and reconciliation with a real worker (issue 3).

Rules run after each committed transaction in ``txmon.alerts.check_transaction``: large
deduction (> TXMON_ALERT_LARGE_DEBIT_CENTS), rapid transactions (> TXMON_ALERT_RAPID_COUNT
in TXMON_ALERT_RAPID_WINDOW_S; one burst, one alert), negative balance. Alerts are stored,
emailed to TXMON_ADMIN_EMAIL, listed and acknowledged through /api/admin/alerts and counted
by rule. Reconciliation finds balance != sum(ledger), shows it on /api/admin/reconciliation
and raises an alert.
"""
from __future__ import annotations

import subprocess
from collections import Counter


from tests.support import invariant_violations, ok
from tests.support.workers import (ADMIN_EMAIL, FLASK_BIN, ROOT, rows, scalar,
                                  wait_until)


RAPID_COUNT = 5


def _alerts(api, **query) -> list[dict]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return ok(api.client.get(f"/api/admin/alerts?{qs}", headers=api.admin()), 200)["alerts"]


def test_alert_rules__one_alert_per_finding_acknowledge_and_counts(app, api, workers, smtp):
    worker = workers.start(smtp=smtp, TXMON_ALERT_RAPID_COUNT=RAPID_COUNT)
    large = app.config["ALERT_LARGE_DEBIT_CENTS"]
    svc = api.service

    api.account("erin", 3 * large)
    ok(api.purchase("erin", large + 1, vid="ve-big"))       # large deduction
    ok(api.purchase("erin", large, vid="ve-limit"))         # exactly the limit: not "larger"
    api.account("frank", 10_000)
    for i in range(12):                                      # one burst of 13 transactions
        ok(api.purchase("frank", 100, vid=f"vf-{i}"))
    api.account("gina", 100)
    neg = ok(api.client.post("/api/v1/accounts/gina/adjustments", headers=svc, json={
        "amount_cents": -300, "reason": "chargeback", "idempotency_key": "kg-1"}))
    assert neg["balance_cents"] == -200
    n_tx = scalar(app, "SELECT count(*) FROM transactions")
    assert n_tx == 3 + 13 + 2

    # Done when every alert-check row is completed (a batch log line may cover many rows).
    wait_until(lambda: scalar(app, "SELECT count(*) FROM outbox WHERE completed_at IS NULL "
                                   "AND task = 'txmon.alerts.check_transaction'") == 0,
               timeout=60, message=lambda: f"every transaction checked; log tail:\n"
                                           f"{worker.log()[-2000:]}")
    alerts = _alerts(api)
    assert Counter(a["rule"] for a in alerts) == {
        "large_deduction": 1, "rapid_transactions": 1, "negative_balance": 1}, alerts
    by_rule = {a["rule"]: a for a in alerts}
    big_tx = scalar(app, "SELECT id FROM transactions WHERE verification_id = 've-big'")
    assert by_rule["large_deduction"]["user_id"] == "erin"
    assert by_rule["large_deduction"]["transaction_id"] == big_tx
    assert by_rule["large_deduction"]["details"]["amount_cents"] == -(large + 1)
    assert by_rule["rapid_transactions"]["user_id"] == "frank"
    assert by_rule["rapid_transactions"]["details"]["count"] > RAPID_COUNT
    assert by_rule["negative_balance"]["user_id"] == "gina"
    assert by_rule["negative_balance"]["transaction_id"] == neg["transaction"]["id"]
    assert by_rule["negative_balance"]["details"]["balance_after_cents"] == -200
    assert {a["status"] for a in alerts} == {"open"}

    # Each alert is emailed to the admin once.
    wait_until(lambda: len(smtp.messages(to=ADMIN_EMAIL)) >= 3, timeout=30,
               message=lambda: f"alert emails ({[m.subject for m in smtp.received]})")
    assert sorted(m.subject for m in smtp.messages(to=ADMIN_EMAIL)) == sorted(
        f"txmon alert: {a['rule']} (user {a['user_id']})" for a in alerts)

    # Counted by rule in the worker's metrics.
    for rule in ("large_deduction", "rapid_transactions", "negative_balance"):
        assert worker.metric("alerts_total", rule=rule) == 1.0, rule

    # Acknowledge.
    rapid = by_rule["rapid_transactions"]
    first = ok(api.client.post(f"/api/admin/alerts/{rapid['id']}/acknowledge",
                                headers=api.admin(), json={"note": "known load test"}), 200)
    assert first["status"] == "acknowledged" and first["note"] == "known load test"
    assert first["acknowledged_at"] is not None
    again = ok(api.client.post(f"/api/admin/alerts/{rapid['id']}/acknowledge",
                                headers=api.admin(), json={"note": "still fine"}), 200)
    assert again["acknowledged_at"] == first["acknowledged_at"] and again["note"] == "still fine"
    assert [a["id"] for a in _alerts(api, status="acknowledged")] == [rapid["id"]]
    assert sorted(a["rule"] for a in _alerts(api, status="open")) == [
        "large_deduction", "negative_balance"]
    r = api.client.post("/api/admin/alerts/999999/acknowledge", headers=api.admin(), json={})
    assert r.status_code == 404
    r = api.client.post(f"/api/admin/alerts/{rapid['id']}/acknowledge", headers=api.user("frank"),
                        json={})
    assert r.status_code == 403
    assert invariant_violations(app) == []


def _run_cli(app, database_url, *args) -> subprocess.CompletedProcess:
    from tests.support.common import clean_env

    env = clean_env(DATABASE_URL=database_url, REDIS_URL=app.config["REDIS_URL"],
                    TXMON_SERVICE_KEYS=",".join(app.config["SERVICE_KEYS"]),
                    TXMON_JWT_SECRET=app.config["JWT_SECRET"])
    return subprocess.run([str(FLASK_BIN), "--app", "api_service", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_reconciliation__finds_planted_mismatch__cli_task_admin_view_and_alert(
        app, api, database_url, workers, smtp, celery_client):
    worker = workers.start(smtp=smtp)
    api.account("rec-ok", 1000)
    api.account("rec-bad", 1000)
    ok(api.purchase("rec-bad", 150, vid="vrb-1"))
    # Somebody edits a balance behind the ledger's back.
    from tests.support.workers import execute

    execute(app, "UPDATE accounts SET balance_cents = balance_cents + 1 WHERE user_id = 'rec-bad'")

    out = _run_cli(app, database_url, "reconcile")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "accounts checked: 2, mismatches: 1" in out.stdout, out.stdout
    assert "rec-bad: balance_differs_from_ledger" in out.stdout, out.stdout

    last = ok(api.client.get("/api/admin/reconciliation", headers=api.admin()), 200)
    assert last["ran_at"] is not None and last["accounts_checked"] == 2
    assert [m["user_id"] for m in last["mismatches"]] == ["rec-bad"]
    mismatch = last["mismatches"][0]
    assert mismatch["balance_cents"] == 851 and mismatch["ledger_sum_cents"] == 850
    assert "balance_differs_from_ledger" in mismatch["problems"]
    alerts = _alerts(api)
    assert [(a["rule"], a["user_id"]) for a in alerts] == [("reconciliation_mismatch", "rec-bad")]
    wait_until(lambda: smtp.messages(
        to=ADMIN_EMAIL, subject="txmon alert: reconciliation_mismatch (user rec-bad)"),
        timeout=30, message="the reconciliation alert emailed to the admin")

    # The hourly beat task does the same on the worker.
    runs = scalar(app, "SELECT count(*) FROM reconciliation_runs")
    celery_client.send_task("txmon.reconcile.run")
    wait_until(lambda: scalar(app, "SELECT count(*) FROM reconciliation_runs") == runs + 1,
               timeout=30, message="txmon.reconcile.run on the worker")
    again = ok(api.client.get("/api/admin/reconciliation", headers=api.admin()), 200)
    assert again["ran_at"] > last["ran_at"]
    assert [m["user_id"] for m in again["mismatches"]] == ["rec-bad"]
    assert worker.lines(r"Reconciliation mismatch: User=rec-bad, .*balance_differs_from_ledger")

    # Repaired: the next run is clean.
    execute(app, "UPDATE accounts SET balance_cents = balance_cents - 1 WHERE user_id = 'rec-bad'")
    celery_client.send_task("txmon.reconcile.run")
    wait_until(lambda: scalar(app, "SELECT count(*) FROM reconciliation_runs") == runs + 2,
               timeout=30, message="second txmon.reconcile.run")
    clean = ok(api.client.get("/api/admin/reconciliation", headers=api.admin()), 200)
    assert clean["mismatches"] == [] and clean["accounts_checked"] == 2
    assert invariant_violations(app) == []
    assert rows(app, "SELECT rule FROM alerts WHERE user_id = 'rec-ok'") == []
