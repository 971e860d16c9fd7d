"""An independent checker of DESIGN.md's ledger invariants 1-6 and delivery guarantees.

It reads the tables with its own SQL and shares no code with the production reconciler
(shared/reconcile.py), so a bug there cannot hide a breach here. Every check is one query
that returns the offending rows; tests/test_invariant_checker.py corrupts rows one way at a
time and proves each check catches its breach.
"""
from __future__ import annotations

from sqlalchemy import text

PRIMARY_TYPE = {"credit": "credit_added", "sms_purchase": "credit_deducted",
                "verification_refund": "instant_refund", "adjustment": "balance_adjusted"}
_PRIMARY = ", ".join(f"'{t}'" for t in PRIMARY_TYPE.values())
_PAIRS = " OR ".join(f"(t.type = '{tx}' AND n.type = '{nt}')" for tx, nt in PRIMARY_TYPE.items())

LEDGER_CHECKS = {
    # 1. balance = sum of the account's amounts
    "balance differs from the sum of its transactions":
        "SELECT a.user_id FROM accounts a LEFT JOIN transactions t ON t.user_id = a.user_id "
        "GROUP BY a.user_id, a.balance_cents "
        "HAVING a.balance_cents <> COALESCE(SUM(t.amount_cents), 0)",
    "transaction of no account":
        "SELECT t.id FROM transactions t LEFT JOIN accounts a ON a.user_id = t.user_id "
        "WHERE a.user_id IS NULL",
    # 2. seq 1..n without gaps or repeats, last_seq = n, every running balance right
    "seq not 1..n":
        "SELECT user_id FROM (SELECT user_id, seq, ROW_NUMBER() OVER "
        "(PARTITION BY user_id ORDER BY seq, id) AS n FROM transactions) s WHERE seq <> n",
    "last_seq differs from the transaction count":
        "SELECT a.user_id FROM accounts a LEFT JOIN transactions t ON t.user_id = a.user_id "
        "GROUP BY a.user_id, a.last_seq HAVING a.last_seq <> COUNT(t.id)",
    "running balance wrong":
        "SELECT id FROM (SELECT id, balance_after_cents, SUM(amount_cents) OVER "
        "(PARTITION BY user_id ORDER BY seq, id ROWS UNBOUNDED PRECEDING) AS running "
        "FROM transactions) s WHERE balance_after_cents <> running",
    # 3. only an adjustment takes a balance below zero; amounts have their type's sign
    "debit below zero other than an adjustment":
        "SELECT id FROM transactions WHERE balance_after_cents < 0 AND amount_cents < 0 "
        "AND type <> 'adjustment'",
    "amount with the wrong sign for its type":
        "SELECT id FROM transactions WHERE (type IN ('credit', 'verification_refund') "
        "AND amount_cents <= 0) OR (type = 'sms_purchase' AND amount_cents >= 0) "
        "OR type NOT IN ('credit', 'sms_purchase', 'verification_refund', 'adjustment')",
    # 4. at most one charge and one refund per verification; refunds only for charged,
    #    uncompleted ones, of the amount charged; the verification points at them
    "verification charged more than once":
        "SELECT verification_id FROM transactions WHERE type = 'sms_purchase' "
        "AND verification_id IS NOT NULL GROUP BY verification_id HAVING COUNT(*) > 1",
    "verification refunded more than once":
        "SELECT verification_id FROM transactions WHERE type = 'verification_refund' "
        "GROUP BY verification_id HAVING COUNT(*) > 1",
    "refund without a charge":
        "SELECT r.id FROM transactions r WHERE r.type = 'verification_refund' AND NOT EXISTS "
        "(SELECT 1 FROM transactions c WHERE c.type = 'sms_purchase' "
        "AND c.verification_id = r.verification_id AND c.user_id = r.user_id "
        "AND c.amount_cents = -r.amount_cents AND c.seq < r.seq)",
    "refund of a completed or pending verification":
        "SELECT r.id FROM transactions r LEFT JOIN verifications v ON v.id = r.verification_id "
        "WHERE r.type = 'verification_refund' "
        "AND (v.id IS NULL OR v.status NOT IN ('cancelled', 'failed', 'timed_out'))",
    "verification's charge is not its purchase":
        "SELECT v.id FROM verifications v LEFT JOIN transactions t "
        "ON t.id = v.charge_transaction_id WHERE t.id IS NULL OR t.type <> 'sms_purchase' "
        "OR t.verification_id <> v.id OR t.amount_cents <> -v.cost_cents",
    "verification's refund is not its refund":
        "SELECT v.id FROM verifications v LEFT JOIN transactions t "
        "ON t.id = v.refund_transaction_id WHERE v.refund_transaction_id IS NOT NULL "
        "AND (t.id IS NULL OR t.type <> 'verification_refund' OR t.verification_id <> v.id)",
    "ended verification without its refund":
        "SELECT v.id FROM verifications v WHERE v.refund_transaction_id IS NULL "
        "AND v.status IN ('cancelled', 'failed', 'timed_out')",
    # 5. one credit per payment
    "payment credited more than once":
        "SELECT reference FROM transactions WHERE type = 'credit' "
        "GROUP BY reference HAVING COUNT(*) > 1",
    # 6. exactly one primary notification per transaction, to its owner, of its type
    "transaction without exactly one primary notification":
        "SELECT t.id FROM transactions t LEFT JOIN notifications n ON n.transaction_id = t.id "
        f"AND n.user_id = t.user_id AND ({_PAIRS}) GROUP BY t.id HAVING COUNT(n.id) <> 1",
    "primary notification of no transaction":
        f"SELECT n.id FROM notifications n WHERE n.type IN ({_PRIMARY}) AND NOT EXISTS "
        "(SELECT 1 FROM transactions t WHERE t.id = n.transaction_id "
        f"AND t.user_id = n.user_id AND ({_PAIRS}))",
}

# Delivery: every follow-up that is due is done. Meaningful only once workers ran and the
# system is idle (tests/support/workers.py ``wait_idle``).
DELIVERY_CHECKS = {
    "due follow-up not done":
        "SELECT id FROM outbox WHERE completed_at IS NULL AND available_at <= :now",
    "notification delivery still pending":
        "SELECT notification_id FROM notification_deliveries WHERE status = 'pending'",
}


def violations(conn, *, delivered: bool = False) -> list[str]:
    """Every breach found through ``conn``; ``delivered`` adds the delivery guarantees."""
    from datetime import datetime, timezone

    checks = dict(LEDGER_CHECKS)
    if delivered:
        checks.update(DELIVERY_CHECKS)
    problems = []
    for name, sql in checks.items():
        bad = conn.execute(text(sql), {"now": datetime.now(timezone.utc)}).fetchall()
        if bad:
            problems.append(f"{name}: {sorted({str(r[0]) for r in bad})[:10]}")
    return problems


def invariant_violations(app, *, delivered: bool = False) -> list[str]:
    """Every breach of the invariants (and, with ``delivered``, of the delivery guarantees)
    in the app's whole database; an empty list when all hold."""
    from shared.db import db

    with app.app_context(), db.engine.connect() as conn:
        return violations(conn, delivered=delivered)
