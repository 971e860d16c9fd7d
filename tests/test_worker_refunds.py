"""Refund timeouts with a real Celery worker (DESIGN.md, "Refund timeouts"; issue 3).

A pending verification past ``expires_at`` is refunded by the workers, exactly once, with
status ``timed_out``, an ``instant_refund`` notification and the log line
``Auto-refund processed: ...`` - within 30 s of expiry.
"""
from __future__ import annotations

from datetime import datetime, timezone


from tests.support import invariant_violations
from tests.support.workers import RowLock, rows, scalar, wait_until



def _seconds_until(iso: str) -> float:
    return (datetime.fromisoformat(iso) - datetime.now(timezone.utc)).total_seconds()


def _verification(api, vid: str) -> dict:
    r = api.client.get(f"/api/v1/verifications/{vid}", headers=api.service)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def _refunds_of(app, vid: str) -> list[dict]:
    return rows(app, "SELECT * FROM transactions WHERE verification_id = :v "
                     "AND type = 'verification_refund'", v=vid)


def _assert_refunded_once(app, api, vid: str, user_id: str, cost: int, worker) -> None:
    ver = _verification(api, vid)
    assert ver["status"] == "timed_out"
    refunds = _refunds_of(app, vid)
    assert len(refunds) == 1, refunds
    assert refunds[0]["amount_cents"] == cost
    assert ver["refund_transaction_id"] == refunds[0]["id"]
    notes = rows(app, "SELECT type, message FROM notifications WHERE transaction_id = :t",
                 t=refunds[0]["id"])
    assert [n["type"] for n in notes] == ["instant_refund"]
    assert "refunded" in notes[0]["message"]
    logged = worker.lines(rf"Auto-refund processed: Verification={vid}, Amount={cost}\b")
    assert len(logged) == 1, logged


def test_timeout__countdown_task_refunds_once_within_30s_of_expiry(app, api, workers):
    worker = workers.start()
    api.account("u-to", 1000)
    r = api.purchase("u-to", 150, vid="v-to-1", timeout_seconds=10)
    assert r.status_code == 201, r.get_json()
    expires_at = r.get_json()["verification"]["expires_at"]
    assert _verification(api, "v-to-1")["status"] == "pending"

    # Bounded by the contract: refunded within 30 s of expiry.
    wait_until(lambda: _verification(api, "v-to-1")["status"] != "pending",
               timeout=_seconds_until(expires_at) + 30, interval=0.2,
               message="v-to-1 refunded within 30 s of expiry")
    _assert_refunded_once(app, api, "v-to-1", "u-to", 150, worker)
    # No beat and no scan ran: the countdown task scheduled at purchase did it.
    assert worker.lines(r"txmon\.refunds\.expire_verification\[.*\] succeeded .*'refunded'")
    assert not worker.lines(r"Task txmon\.refunds\.(scan_expired|expire_batch)\[")
    assert scalar(app, "SELECT balance_cents FROM accounts WHERE user_id = 'u-to'") == 1000
    assert invariant_violations(app) == []


def test_timeout__countdown_and_scan_racing__still_one_refund(app, api, workers, beat):
    """Force the race: hold the account row at expiry so the countdown task and the scan's
    batch task both block inside the refund, then let them go at once."""
    worker = workers.start()
    api.account("u-race", 1000)
    r = api.purchase("u-race", 275, vid="v-race-1", timeout_seconds=10)
    assert r.status_code == 201, r.get_json()
    expires_at = r.get_json()["verification"]["expires_at"]
    lock = RowLock(app, "SELECT * FROM accounts WHERE user_id = 'u-race' FOR UPDATE")
    try:
        # The race is set up only if nothing refunded before the lock was taken.
        assert scalar(app, "SELECT status FROM verifications WHERE id = 'v-race-1'") == "pending"
        wait_until(lambda: _seconds_until(expires_at) < 0, timeout=30, message="expiry")

        def blocked_refunds() -> int:
            # The first path to claim the verification waits for the account row; the other
            # waits for the verification row it claimed (shared/ledger.py: claim first).
            # A claim leaves with its BEGIN in one message: match inside the text.
            return scalar(app, "SELECT count(*) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND wait_event_type = 'Lock' "
                               "AND (query ILIKE '%UPDATE accounts%' "
                               "OR query ILIKE '%UPDATE verifications%')")

        # The countdown task reaches the lock on its own; then the path of beat's scan
        # (every 10 s, beat as scripts/run runs it).
        wait_until(lambda: blocked_refunds() >= 1, timeout=30,
                   message="countdown task blocked in the refund")
        beat.start()
        wait_until(lambda: blocked_refunds() >= 2, timeout=60,
                   message="scan's expire_batch blocked in the refund too")
        assert _verification(api, "v-race-1")["status"] == "pending"
    finally:
        lock.release()

    wait_until(lambda: _verification(api, "v-race-1")["status"] != "pending", timeout=30,
               message="v-race-1 refunded once the lock is released")
    # Both paths have finished (each logs its outcome) before we count.
    wait_until(lambda: worker.lines(r"txmon\.refunds\.expire_verification\[.*\] succeeded")
               and worker.lines(r"txmon\.refunds\.expire_batch\[.*\] succeeded"),
               timeout=30, message="countdown and batch tasks finished")
    wait_until(lambda: len(worker.lines(r"txmon\.refunds\.expire_batch\[.*\] succeeded"))
               >= len(worker.lines(r"txmon\.refunds\.expire_batch\[.*\] received")),
               timeout=30, message="every expire_batch finished")
    _assert_refunded_once(app, api, "v-race-1", "u-race", 275, worker)
    assert scalar(app, "SELECT balance_cents FROM accounts WHERE user_id = 'u-race'") == 1000
    assert invariant_violations(app) == []
