"""Ledger invariants under real concurrency (DESIGN.md, "Ledger invariants").

Every scenario starts N real threads, each with its own Flask test client, released together
by a barrier, and then checks the answers against the contract and the database against
invariants 1-6. Runs on Postgres and on SQLite (where writes serialize; it must hold there too).
"""
from __future__ import annotations

import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import invariant_violations

pytestmark = pytest.mark.smoke

BARRIER_TIMEOUT_S = 60  # only a guard against a hung thread, never an assertion


def run_together(app, jobs, threads: int | None = None) -> list[tuple[int, dict]]:
    """Run ``jobs`` (callables taking a test client) on ``threads`` threads started together.

    Jobs are dealt round-robin to the threads; each thread has its own ``app.test_client()``.
    Returns (status, json body) per job, in the order of ``jobs``. Any exception in a thread
    is re-raised here.
    """
    threads = threads or len(jobs)
    barrier = threading.Barrier(threads, timeout=BARRIER_TIMEOUT_S)
    results: list = [None] * len(jobs)

    def worker(index: int) -> None:
        client = app.test_client()
        mine = list(range(index, len(jobs), threads))
        barrier.wait()
        for j in mine:
            r = jobs[j](client)
            results[j] = (r.status_code, r.get_json())

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(worker, i) for i in range(threads)]
        for f in futures:
            f.result()
    assert all(r is not None for r in results)
    return results


def transactions_of(api, user_id: str) -> list[dict]:
    r = api.client.get(f"/api/v1/accounts/{user_id}/transactions?limit=200",
                       headers=api.service)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["next_cursor"] is None
    return sorted(body["transactions"], key=lambda t: t["seq"])


def balance_of(api, user_id: str) -> int:
    r = api.client.get(f"/api/v1/accounts/{user_id}", headers=api.service)
    assert r.status_code == 200, r.get_json()
    return r.get_json()["balance_cents"]


def no_server_errors(results) -> None:
    bad = [(s, b) for s, b in results if s >= 500]
    assert bad == [], bad


# -- purchases racing for one balance ----------------------------------------------------------

def test_40_purchases_on_2500__exactly_25_succeed_and_seq_is_gapless(api, app):
    api.account("race-1", 2500)
    service = api.service

    def purchase(i):
        body = {"id": f"race-1-v{i}", "user_id": "race-1", "service_name": "WhatsApp",
                "country": "US", "cost_cents": 100}
        return lambda c: c.post("/api/v1/verifications", json=body, headers=service)

    results = run_together(app, [purchase(i) for i in range(40)], threads=16)

    no_server_errors(results)
    statuses = Counter(s for s, _ in results)
    assert statuses == {201: 25, 402: 15}, statuses
    for status, body in results:
        if status == 402:
            assert body["error"]["code"] == "insufficient_funds"
            assert body["error"]["details"]["required_cents"] == 100
            assert 0 <= body["error"]["details"]["balance_cents"] < 100
    # Each success saw a distinct running balance 2400, 2300, ..., 0.
    afters = sorted(b["balance_cents"] for s, b in results if s == 201)
    assert afters == list(range(0, 2500, 100))
    assert balance_of(api, "race-1") == 0

    txs = transactions_of(api, "race-1")
    assert [t["seq"] for t in txs] == list(range(1, 27))
    assert Counter(t["type"] for t in txs) == {"credit": 1, "sms_purchase": 25}
    running = 0
    for t in txs:
        running += t["amount_cents"]
        assert t["balance_after_cents"] == running, t
    assert invariant_violations(app) == []


# -- idempotent credits -------------------------------------------------------------------------

def test_20_identical_credits_at_once__one_transaction_and_identical_answers(api, app):
    api.account("cred-1")
    service = api.service
    body = {"amount_cents": 777, "payment_id": "pay-same-1"}

    def credit(c):
        return c.post("/api/v1/accounts/cred-1/credits", json=body, headers=service)

    results = run_together(app, [credit] * 20)

    no_server_errors(results)
    assert Counter(s for s, _ in results) == {201: 1, 200: 19}
    first = results[0][1]
    assert all(b == first for _, b in results), [b for _, b in results if b != first][:2]
    assert first["balance_cents"] == 777
    assert first["transaction"]["reference"] == "pay-same-1"
    txs = transactions_of(api, "cred-1")
    assert len(txs) == 1 and txs[0]["amount_cents"] == 777
    assert balance_of(api, "cred-1") == 777
    assert invariant_violations(app) == []


# -- cancel / fail / complete racing on one verification ---------------------------------------

ENDINGS = {"cancel": "cancelled", "fail": "failed", "complete": "completed"}


@pytest.mark.parametrize("round_no", range(20))
def test_cancel_fail_complete_race__one_ending_at_most_one_refund(api, app, round_no):
    user, vid, cost = f"end-{round_no}", f"end-v{round_no}", 150
    api.account(user, 1000)
    r = api.purchase(user, cost, vid=vid)
    assert r.status_code == 201, r.get_json()
    service = api.service
    # Two calls of each kind, shuffled so the start order differs per round.
    kinds = ["cancel", "fail", "complete"] * 2
    random.Random(round_no).shuffle(kinds)

    def call(kind):
        return lambda c: c.post(f"/api/v1/verifications/{vid}/{kind}", json={},
                                headers=service)

    results = run_together(app, [call(k) for k in kinds])

    no_server_errors(results)
    ver = api.client.get(f"/api/v1/verifications/{vid}", headers=service).get_json()
    final = ver["status"]
    assert final in ENDINGS.values()
    winner = next(k for k, s in ENDINGS.items() if s == final)
    refunds = set()
    for kind, (status, body) in zip(kinds, results):
        if kind == winner:
            assert status == 200, (kind, body)
            if kind == "complete":
                assert body["status"] == "completed"
            else:
                assert body["verification"]["status"] == final
                refunds.add(body["refund"]["id"])
        else:
            assert status == 409, (kind, status, body)
            assert body["error"]["code"] == "invalid_state"
    txs = transactions_of(api, user)
    refund_txs = [t for t in txs if t["type"] == "verification_refund"]
    if final == "completed":
        assert refund_txs == [] and ver["refund_transaction_id"] is None
        assert balance_of(api, user) == 1000 - cost
    else:
        # Both same-kind winners got the same, single refund.
        assert len(refund_txs) == 1 and refunds == {refund_txs[0]["id"]}
        assert ver["refund_transaction_id"] == refund_txs[0]["id"]
        assert refund_txs[0]["amount_cents"] == cost
        assert balance_of(api, user) == 1000
    assert invariant_violations(app) == []


# -- idempotent purchases -----------------------------------------------------------------------

@pytest.mark.parametrize("balance", [1000, 150], ids=["plenty", "exactly-one-purchase"])
def test_20_identical_purchases_at_once__one_charge(api, app, balance):
    """With exactly one purchase's worth, the replays must not turn into 402s either."""
    api.account("dup-1", balance)
    service = api.service
    body = {"id": "dup-v1", "user_id": "dup-1", "service_name": "WhatsApp", "country": "US",
            "cost_cents": 150}

    def purchase(c):
        return c.post("/api/v1/verifications", json=body, headers=service)

    results = run_together(app, [purchase] * 20)

    no_server_errors(results)
    assert Counter(s for s, _ in results) == {201: 1, 200: 19}, results[:3]
    first = results[0][1]
    assert all(b == first for _, b in results)
    assert first["balance_cents"] == balance - 150
    assert first["verification"]["charge_transaction_id"] == first["transaction"]["id"]
    charges = [t for t in transactions_of(api, "dup-1") if t["type"] == "sms_purchase"]
    assert len(charges) == 1
    assert balance_of(api, "dup-1") == balance - 150
    assert invariant_violations(app) == []


# -- idempotent adjustments ---------------------------------------------------------------------

def test_20_identical_adjustments_at_once__one_applies(api, app):
    api.account("adj-1", 100)
    service = api.service
    body = {"amount_cents": -500, "reason": "chargeback", "idempotency_key": "adj-key-1"}

    def adjust(c):
        return c.post("/api/v1/accounts/adj-1/adjustments", json=body, headers=service)

    results = run_together(app, [adjust] * 20)

    no_server_errors(results)
    assert Counter(s for s, _ in results) == {201: 1, 200: 19}
    assert all(b == results[0][1] for _, b in results)
    assert results[0][1]["balance_cents"] == -400
    adjustments = [t for t in transactions_of(api, "adj-1") if t["type"] == "adjustment"]
    assert len(adjustments) == 1
    assert balance_of(api, "adj-1") == -400
    assert invariant_violations(app) == []


def test_same_adjustment_key_with_different_amounts_at_once__one_wins_others_409(api, app):
    api.account("adj-2", 1000)
    service = api.service
    bodies = [{"amount_cents": -300, "reason": "chargeback", "idempotency_key": "adj-key-2"},
              {"amount_cents": 250, "reason": "goodwill", "idempotency_key": "adj-key-2"}] * 8

    def adjust(body):
        return lambda c: c.post("/api/v1/accounts/adj-2/adjustments", json=body,
                                headers=service)

    results = run_together(app, [adjust(b) for b in bodies])

    no_server_errors(results)
    winner = next(body for body, (s, _) in zip(bodies, results) if s == 201)
    for body, (status, answer) in zip(bodies, results):
        if body == winner:
            assert status in (200, 201), answer
            assert answer["transaction"]["amount_cents"] == winner["amount_cents"]
        else:
            assert status == 409, answer
            assert answer["error"]["code"] == "idempotency_mismatch"
    assert Counter(s for s, _ in results)[201] == 1
    assert balance_of(api, "adj-2") == 1000 + winner["amount_cents"]
    assert invariant_violations(app) == []


# -- a mixed workload on a few accounts ---------------------------------------------------------

def test_mixed_concurrent_workload__balances_match_answers_and_invariants_hold(api, app):
    rng = random.Random(20261126)
    users = ["mix-a", "mix-b", "mix-c"]
    expected = {u: 1000 for u in users}
    for u in users:
        api.account(u, 1000)
    # Pending verifications to end concurrently (two each, one of them raced by two calls).
    pending = []
    for u in users:
        for n in range(4):
            vid = f"{u}-pre{n}"
            assert api.purchase(u, 120, vid=vid).status_code == 201
            expected[u] -= 120
            pending.append((u, vid))
    service = api.service
    jobs, meta = [], []

    def post(path, body):
        return lambda c: c.post(path, json=body, headers=service)

    for i in range(60):
        u = rng.choice(users)
        op = rng.choice(["credit", "credit-replay", "purchase", "purchase", "adjust"])
        if op == "credit":
            amount = rng.randint(1, 300)
            jobs.append(post(f"/api/v1/accounts/{u}/credits",
                             {"amount_cents": amount, "payment_id": f"mixpay-{i}"}))
        elif op == "credit-replay":
            amount = 55
            jobs.append(post(f"/api/v1/accounts/{u}/credits",
                             {"amount_cents": amount, "payment_id": f"mixpay-shared-{u}"}))
        elif op == "purchase":
            amount = rng.randint(50, 400)
            jobs.append(post("/api/v1/verifications",
                             {"id": f"mixv-{i}", "user_id": u, "service_name": "Telegram",
                              "country": "DE", "cost_cents": amount}))
        else:
            amount = rng.choice([-200, -50, 75])
            jobs.append(post(f"/api/v1/accounts/{u}/adjustments",
                             {"amount_cents": amount, "reason": "mixed",
                              "idempotency_key": f"mixadj-{i}"}))
        meta.append((op, u, amount))
    for u, vid in pending:
        for kind in rng.sample(["cancel", "fail", "complete", "cancel"], 2):
            jobs.append(post(f"/api/v1/verifications/{vid}/{kind}", {}))
            meta.append((kind, u, vid))
    order = list(range(len(jobs)))
    rng.shuffle(order)
    jobs, meta = [jobs[i] for i in order], [meta[i] for i in order]

    results = run_together(app, jobs, threads=12)

    no_server_errors(results)
    refunded = {}
    for (op, u, x), (status, body) in zip(meta, results):
        if op in ("credit", "credit-replay", "adjust"):
            assert status in (200, 201), (op, body)
            if status == 201:
                expected[u] += x
        elif op == "purchase":
            assert status in (201, 402), (op, body)
            if status == 201:
                expected[u] -= x
        elif op in ("cancel", "fail"):
            assert status in (200, 409), (op, body)
            if status == 200:
                refunded.setdefault(x, set()).add(body["refund"]["id"])
                assert body["refund"]["amount_cents"] == 120
        else:
            assert status in (200, 409), (op, body)
    for vid, ids in refunded.items():
        assert len(ids) == 1, (vid, ids)
        expected[next(u for u, v in pending if v == vid)] += 120
    for u in users:
        assert balance_of(api, u) == expected[u], u
        txs = transactions_of(api, u)
        assert [t["seq"] for t in txs] == list(range(1, len(txs) + 1))
    assert invariant_violations(app) == []
