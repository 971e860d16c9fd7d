"""The alert rules run in-process on both databases (the worker tests cover them on Postgres
with a real worker): window counts bind datetimes as the column stores them, a burst fires
once while its alert is open, a refund burst has a rule of its own."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from shared import alerts, ledger
from shared.db import db, utcnow
from shared.models import Transaction

transactions = Transaction.__table__

pytestmark = pytest.mark.smoke


@pytest.fixture
def rules_config(app, monkeypatch):
    monkeypatch.setitem(app.config, "ALERT_RAPID_COUNT", 3)
    monkeypatch.setitem(app.config, "ALERT_RAPID_WINDOW_S", 300)
    return app


def _check(app, tx_id: int) -> list[str]:
    from worker_service.tasks.alerts import check

    with app.app_context():
        return check(tx_id)


def _rules(app, user_id: str) -> list[str]:
    with app.app_context():
        return sorted(a.rule for a in alerts.list_alerts(status=None, limit=100)
                      if a.user_id == user_id)


def test_rapid_transactions__fires_past_the_count_once_while_open(rules_config, api):
    app = rules_config
    api.account("ar-1", 10_000)  # its seed credit is transaction 1 in the window
    fired = []
    with app.app_context():
        for i in range(5):
            m = ledger.charge_verification(verification_id=f"ar-1-v{i}", user_id="ar-1",
                                           service_name="S", country="US", cost_cents=10,
                                           timeout_seconds=60)
            fired.append(_check(app, m.transaction["id"]))
    # 1 credit + 3 purchases = 4 > 3 on the third purchase; later ones find it open.
    assert fired == [[], [], ["rapid_transactions"], [], []]
    assert _rules(app, "ar-1") == ["rapid_transactions"]
    assert _rules(app, "someone-else") == []


def test_rapid_transactions__other_users_and_old_rows_do_not_count(rules_config, api):
    app = rules_config
    api.account("ar-2", 10_000)
    api.account("ar-3", 10_000)
    with app.app_context():
        for i in range(3):
            ledger.charge_verification(verification_id=f"ar-3-v{i}", user_id="ar-3",
                                       service_name="S", country="US", cost_cents=10,
                                       timeout_seconds=60)
        with db.engine.begin() as conn:  # ar-2's credit long before the window
            conn.execute(update(transactions).where(transactions.c.user_id == "ar-2")
                         .values(created_at=utcnow() - timedelta(hours=1)))
        last = None
        for i in range(3):
            last = ledger.charge_verification(verification_id=f"ar-2-v{i}", user_id="ar-2",
                                              service_name="S", country="US", cost_cents=10,
                                              timeout_seconds=60)
    # ar-2: 3 purchases in the window, its credit out of it, ar-3's rows not its own: not > 3.
    assert _check(app, last.transaction["id"]) == []


def test_large_deduction__fires_per_transaction(rules_config, api):
    app = rules_config
    large = app.config["ALERT_LARGE_DEBIT_CENTS"]
    api.account("ar-4", 3 * large + 10)
    with app.app_context():
        big = ledger.charge_verification(verification_id="ar-4-v1", user_id="ar-4",
                                         service_name="S", country="US",
                                         cost_cents=large + 1, timeout_seconds=60)
        limit = ledger.charge_verification(verification_id="ar-4-v2", user_id="ar-4",
                                           service_name="S", country="US", cost_cents=large,
                                           timeout_seconds=60)
    assert _check(app, big.transaction["id"]) == ["large_deduction"]
    assert _check(app, limit.transaction["id"]) == []


def test_once_while_open__racing_raises_store_one_alert_until_acknowledged(app):
    """Checks racing over one burst (different buckets, so different dedup keys) store one
    open alert between them; once it is acknowledged the next burst raises a new one."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int):
        with app.app_context():
            return alerts.raise_alert(rule="rapid_transactions", user_id="ar-race",
                                      details={"i": i}, dedup_key=f"rapid:ar-race:{i}",
                                      once_while_open=True)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    ids = {alert_id for alert_id, _ in results}
    assert len(ids) == 1 and sum(created for _, created in results) == 1, results
    # A rule without once_while_open is not limited by it.
    with app.app_context():
        other = alerts.raise_alert(rule="large_deduction", user_id="ar-race", details={},
                                   dedup_key="large:ar-race:1")
        assert other[1] is True
        alerts.acknowledge(alert_id=ids.pop(), note="seen")
    again = one(99)
    assert again[1] is True
    assert one(100) == (again[0], False)
    assert _rules(app, "ar-race") == ["large_deduction", "rapid_transactions",
                                      "rapid_transactions"]


def test_check_leaves_pooled_connections_as_the_app_set_them(app, api):
    """The check reads in autocommit on Postgres; afterwards every pooled connection is back
    in SQLAlchemy's usual mode, and on SQLite pysqlite's own transaction handling stays off
    (shared/db.py), which a reset after autocommit would turn back on."""
    api.account("pool-1", 1000)
    with app.app_context():
        tx = ledger.charge_verification(verification_id="v-pool-1", user_id="pool-1",
                                        service_name="S", country="US", cost_cents=1,
                                        timeout_seconds=300).transaction
    assert _check(app, tx["id"]) == []
    with app.app_context():
        db.session.remove()
        held = [db.engine.raw_connection() for _ in range(db.engine.pool.checkedin())]
        try:
            assert held
            for pooled in held:
                conn = pooled.dbapi_connection
                if db.engine.dialect.name == "sqlite":
                    assert conn.isolation_level is None
                else:
                    assert conn.autocommit is False
                    assert conn.info.transaction_status == 0  # IDLE
        finally:
            for pooled in held:
                pooled.close()
