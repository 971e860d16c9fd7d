"""Refund timeouts with a real Celery worker (DESIGN.md, "Refund timeouts"; issue 3).

A pending verification past ``expires_at`` is refunded by the workers, exactly once, with
status ``timed_out``, an ``instant_refund`` notification and the log line
``Auto-refund processed: ...`` - within 30 s of expiry.
"""
from __future__ import annotations

from datetime import datetime, timezone

from tests.support import invariant_violations, ok
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


def test_timeout__countdown_rows_refund_each_once_within_30s_of_expiry__none_early(
        app, api, workers):
    """Four purchases committed before any worker runs and one after, all with the shortest
    timeout (10 s): each purchase's countdown row waits in the outbox until its expiry (the
    four written while no worker ran as well); the relay claims the rows due at each pass,
    those come due together in one countdown task. Every verification is refunded once, never
    before its expires_at and within 30 s of it, by the countdown rows alone: no beat, no
    scan. One expiry wait for all five."""
    owner, costs, expiry = {}, {}, {}

    def purchase(vid: str, user_id: str, cost: int) -> None:
        api.account(user_id, 1000)
        r = ok(api.purchase(user_id, cost, vid=vid, timeout_seconds=10))
        owner[vid], costs[vid], expiry[vid] = user_id, cost, r["verification"]["expires_at"]

    for i in range(4):
        purchase(f"v-cb{i}", f"cb{i}", 100 + i)
    worker = workers.start()
    purchase("v-to-1", "u-to", 150)
    assert {_verification(api, v)["status"] for v in expiry} == {"pending"}

    # Bounded by the contract: refunded within 30 s of expiry.
    wait_until(lambda: all(_verification(api, v)["status"] != "pending" for v in expiry),
               timeout=max(_seconds_until(e) for e in expiry.values()) + 30, interval=0.2,
               message=lambda: f"all five refunded within 30 s of expiry; log:\n"
                               f"{worker.log()[-2000:]}")
    for vid in expiry:
        _assert_refunded_once(app, api, vid, owner[vid], costs[vid], worker)
        # Nothing early: each refund committed at or after its verification's expiry.
        refund = _refunds_of(app, vid)[0]
        assert refund["created_at"] >= datetime.fromisoformat(expiry[vid]), (vid, refund)
        assert scalar(app, "SELECT balance_cents FROM accounts WHERE user_id = :u",
                      u=owner[vid]) == 1000
    # No beat and no scan ran: the countdown rows written at purchase did it. Rows run
    # inside a batch are logged with their outbox row instead of a task id.
    assert worker.lines(r"txmon\.refunds\.expire_verification\[.*\] succeeded .*'refunded'")
    assert len(worker.lines(r"Task txmon\.refunds\.expire_verification\[outbox:\d+\] "
                            r"succeeded: 'refunded'")) == 5, worker.log()[-3000:]
    assert not worker.lines(r"Task txmon\.refunds\.(scan_expired|expire_batch)\[")
    assert invariant_violations(app) == []


def test_timeout__countdown_and_scan_racing__still_one_refund(app, api, workers, beat):
    """Force the race: hold the account row at expiry so the countdown task and the scan's
    batch task both block inside the refund, then let them go at once. The purchase and
    the lock come first; beat (as scripts/run runs it, the scan every 10 s from its start)
    and the worker start during the expiry wait, so beat's first scan comes soon after the
    expiry."""
    api.account("u-race", 1000)
    r = api.purchase("u-race", 275, vid="v-race-1", timeout_seconds=10)
    assert r.status_code == 201, r.get_json()
    expires_at = r.get_json()["verification"]["expires_at"]
    lock = RowLock(app, "SELECT * FROM accounts WHERE user_id = 'u-race' FOR UPDATE")
    try:
        beat.start()
        worker = workers.start()
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

        # The countdown task reaches the lock on its own; then the path of beat's scan.
        wait_until(lambda: blocked_refunds() >= 1, timeout=30,
                   message="countdown task blocked in the refund")
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
