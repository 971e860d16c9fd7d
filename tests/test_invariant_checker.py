"""The suite's invariant checker (tests/support/invariants.py) catches every breach.

A small, valid ledger is built through the API; each case then corrupts rows one way inside a
transaction (dropping the schema constraint that would refuse the corruption, where one
exists: the checker must not rely on the schema), runs the checker on that transaction and
rolls back. Postgres only: SQLite cannot drop a constraint inside a transaction.
"""
from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.support.invariants import violations

TX = "(SELECT id FROM transactions WHERE user_id = '{u}' AND seq = {seq})"
U1_PURCHASE, U1_REFUND = TX.format(u="u1", seq=2), TX.format(u="u1", seq=4)
COPY_TX = ("INSERT INTO transactions (user_id, seq, amount_cents, balance_after_cents, type, "
           "status, verification_id, reference, created_at) SELECT user_id, 5, amount_cents, "
           "balance_after_cents + amount_cents, type, status, verification_id, reference, "
           "created_at FROM transactions WHERE id = {id}")
FIX_U1 = ("UPDATE accounts SET last_seq = 5, balance_cents = "
          "(SELECT SUM(amount_cents) FROM transactions WHERE user_id = 'u1') WHERE user_id = 'u1'")

CASES = {
    "balance differs from the sum of its transactions": [
        "UPDATE accounts SET balance_cents = balance_cents + 1 WHERE user_id = 'u1'"],
    "transaction of no account": [
        "ALTER TABLE transactions DROP CONSTRAINT fk_transactions_user_id_accounts",
        "INSERT INTO transactions (user_id, seq, amount_cents, balance_after_cents, type, status,"
        " created_at) VALUES ('ghost', 1, 5, 5, 'adjustment', 'completed', now())"],
    "seq not 1..n": [  # a gap
        "UPDATE transactions SET seq = 7 WHERE user_id = 'u1' AND seq = 4"],
    "seq not 1..n ": [  # a repeat
        "ALTER TABLE transactions DROP CONSTRAINT uq_transactions_user_id_seq",
        "UPDATE transactions SET seq = 2 WHERE user_id = 'u1' AND seq = 3"],
    "last_seq differs from the transaction count": [
        "UPDATE accounts SET last_seq = last_seq + 1 WHERE user_id = 'u1'"],
    "running balance wrong": [  # a middle row: the last row and the balance still agree
        f"UPDATE transactions SET balance_after_cents = balance_after_cents + 1 "
        f"WHERE id = {U1_PURCHASE}"],
    "debit below zero other than an adjustment": [  # u2: credit 100, purchase 150, all summed
        "UPDATE transactions SET amount_cents = 100, balance_after_cents = 100 "
        "WHERE user_id = 'u2' AND seq = 1",
        "UPDATE transactions SET balance_after_cents = -50 WHERE user_id = 'u2' AND seq = 2",
        "UPDATE accounts SET balance_cents = -50 WHERE user_id = 'u2'"],
    "amount with the wrong sign for its type": [
        f"UPDATE transactions SET type = 'credit' WHERE id = {U1_PURCHASE}"],
    "verification charged more than once": [
        "DROP INDEX uq_transactions_verification_type",
        COPY_TX.format(id=U1_PURCHASE), FIX_U1],
    "verification refunded more than once": [
        "DROP INDEX uq_transactions_verification_type",
        COPY_TX.format(id=U1_REFUND), FIX_U1],
    "refund without a charge": [
        f"UPDATE transactions SET verification_id = 'v1' WHERE id = {U1_REFUND}"],
    "refund of a completed or pending verification": [
        "UPDATE verifications SET status = 'completed' WHERE id = 'v2'"],
    "verification's charge is not its purchase": [
        "UPDATE verifications SET cost_cents = cost_cents + 1 WHERE id = 'v1'"],
    "verification's refund is not its refund": [
        "UPDATE verifications SET refund_transaction_id = charge_transaction_id "
        "WHERE id = 'v2'"],
    "ended verification without its refund": [
        "UPDATE verifications SET status = 'cancelled' WHERE id = 'v1'"],
    "payment credited more than once": [
        "DROP INDEX uq_transactions_type_reference",
        "UPDATE transactions SET reference = 'seed-u1' WHERE user_id = 'u2' AND seq = 1"],
    "transaction without exactly one primary notification": [  # none
        f"DELETE FROM notifications WHERE transaction_id = {U1_PURCHASE}"],
    "transaction without exactly one primary notification ": [  # two
        "ALTER TABLE notifications DROP CONSTRAINT uq_notifications_transaction_id",
        "INSERT INTO notifications (user_id, type, title, message, amount_cents, transaction_id,"
        " read, created_at) SELECT user_id, type, title, message, amount_cents,"
        f" transaction_id, read, created_at FROM notifications"
        f" WHERE transaction_id = {U1_PURCHASE}"],
    "transaction without exactly one primary notification  ": [  # to someone else
        f"UPDATE notifications SET user_id = 'u2' WHERE transaction_id = {U1_PURCHASE}"],
    "primary notification of no transaction": [  # of the wrong type
        f"UPDATE notifications SET type = 'credit_added' WHERE transaction_id = {U1_PURCHASE}"],
}


@pytest.fixture
def ledger(api, database_url):
    """u1: credit 1000, v1 charged 150, v2 charged 200 and cancelled (refunded); u2: credit
    150, v3 charged 150."""
    if not database_url.startswith("postgres"):
        pytest.skip("corrupting past the schema's constraints needs transactional DDL")
    api.account("u1", 1000)
    api.account("u2", 150)
    for user, vid, cost in (("u1", "v1", 150), ("u1", "v2", 200), ("u2", "v3", 150)):
        assert api.purchase(user, cost, vid=vid).status_code == 201
    r = api.client.post("/api/v1/verifications/v2/cancel", json={}, headers=api.service)
    assert r.status_code == 200, r.get_json()
    return api.app


def _found(app, statements: list[str], **kw) -> list[str]:
    from shared.db import db

    with app.app_context(), db.engine.connect() as conn:
        tx = conn.begin()
        try:
            for sql in statements:
                conn.execute(text(sql))
            return violations(conn, **kw)
        finally:
            tx.rollback()


def test_the_valid_ledger_passes(ledger):
    assert _found(ledger, []) == []
    assert _found(ledger, [], delivered=False) == []


@pytest.mark.parametrize("breach", list(CASES), ids=lambda b: b.strip().replace(" ", "_"))
def test_each_breach_is_caught(ledger, breach):
    found = _found(ledger, CASES[breach])
    assert any(p.startswith(breach.strip() + ":") for p in found), found


def test_a_wrong_middle_running_balance_is_caught_where_the_reconciler_sees_nothing(ledger):
    """The production reconciler compares only the last row; this checker every row."""
    from shared import reconcile
    from shared.db import db

    with ledger.app_context(), db.engine.connect() as conn:
        tx = conn.begin()
        conn.execute(text(CASES["running balance wrong"][0]))
        assert reconcile.check_accounts(conn, ["u1", "u2"]) == []
        assert violations(conn) == [f"running balance wrong: ['{_id(conn, 'u1', 2)}']"]
        tx.rollback()


def test_a_purchase_below_zero_is_the_only_breach_of_a_consistent_ledger(ledger):
    found = _found(ledger, CASES["debit below zero other than an adjustment"])
    assert len(found) == 1 and found[0].startswith("debit below zero"), found


def test_delivery__every_due_follow_up_done_and_no_delivery_pending(ledger):
    # No worker ran: the follow-ups of every commit are still due.
    assert any(p.startswith("due follow-up not done:") for p in _found(ledger, [],
                                                                       delivered=True))
    done = "UPDATE outbox SET dispatched_at = now(), completed_at = now()"
    sent = "UPDATE notification_deliveries SET status = 'sent'"
    assert any(p.startswith("notification delivery still pending:")
               for p in _found(ledger, [done], delivered=True))
    done = [done, sent]
    assert _found(ledger, done, delivered=True) == []
    later = "UPDATE outbox SET available_at = now() + interval '1 hour' WHERE id = " \
            "(SELECT min(id) FROM outbox)"
    undone = "UPDATE outbox SET completed_at = NULL WHERE id = (SELECT min(id) FROM outbox)"
    assert _found(ledger, [*done, later, undone], delivered=True) == []  # not due yet
    assert [p.split(":")[0] for p in _found(ledger, [*done, undone], delivered=True)] == [
        "due follow-up not done"]
    pending = ("UPDATE notification_deliveries SET status = 'pending' WHERE channel = 'email'"
               " AND notification_id = (SELECT id FROM notifications WHERE transaction_id = "
               f"{U1_PURCHASE})")
    assert [p.split(":")[0] for p in _found(ledger, [*done, pending], delivered=True)] == [
        "notification delivery still pending"]


def _id(conn, user: str, seq: int) -> int:
    return conn.execute(text(TX.format(u=user, seq=seq))).scalar_one()
