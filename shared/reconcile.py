"""Reconciliation: for every account, balance == sum of its ledger and seq runs 1..last_seq.

Works in batches of accounts with one aggregate query per batch, so it scales with the
number of accounts without loading transactions into Python.
"""
from __future__ import annotations

import logging

from sqlalchemy import func, insert, select

from shared.db import db, utcnow
from shared.models import Account, ReconciliationRun, Transaction

log = logging.getLogger("txmon.reconcile")


def check_accounts(conn, user_ids: list[str]) -> list[dict]:
    """Mismatches among the given accounts (empty when all hold)."""
    t, a = Transaction, Account
    sums = (select(t.user_id, func.coalesce(func.sum(t.amount_cents), 0).label("total"),
                   func.count().label("n"), func.max(t.seq).label("max_seq"),
                   func.min(t.seq).label("min_seq"))
            .where(t.user_id.in_(user_ids)).group_by(t.user_id).subquery())
    last_after = (select(t.balance_after_cents).where(t.user_id == a.user_id)
                  .order_by(t.seq.desc()).limit(1).scalar_subquery())
    rows = conn.execute(
        select(a.user_id, a.balance_cents, a.last_seq, sums.c.total, sums.c.n, sums.c.max_seq,
               sums.c.min_seq, last_after.label("last_after"))
        .outerjoin(sums, sums.c.user_id == a.user_id).where(a.user_id.in_(user_ids))).all()
    found = []
    for r in rows:
        total, n, max_seq = int(r.total or 0), int(r.n or 0), int(r.max_seq or 0)
        problems = []
        if r.balance_cents != total:
            problems.append("balance_differs_from_ledger")
        if not (n == max_seq == r.last_seq and (n == 0 or r.min_seq == 1)):
            problems.append("seq_gap")
        if n and r.last_after != r.balance_cents:
            problems.append("balance_after_differs")
        if problems:
            found.append({"user_id": r.user_id, "balance_cents": r.balance_cents,
                          "ledger_sum_cents": total, "last_seq": r.last_seq,
                          "transaction_count": n, "problems": problems})
    return found


def run(*, batch_size: int = 1000) -> dict:
    """Check every account, store the run, alert on each mismatch; returns the run."""
    from shared import alerts

    checked, mismatches, after = 0, [], ""
    ran_at = utcnow()
    with db.engine.connect() as conn:
        while True:
            ids = conn.execute(select(Account.user_id).where(Account.user_id > after)
                               .order_by(Account.user_id).limit(batch_size)).scalars().all()
            if not ids:
                break
            checked += len(ids)
            mismatches.extend(check_accounts(conn, ids))
            after = ids[-1]
    with db.engine.begin() as conn:
        conn.execute(insert(ReconciliationRun.__table__), {
            "ran_at": ran_at, "accounts_checked": checked, "mismatches": mismatches})
    for m in mismatches:
        log.error("Reconciliation mismatch: User=%s, %s", m["user_id"], ",".join(m["problems"]))
        alerts.raise_alert(rule="reconciliation_mismatch", user_id=m["user_id"], details=m,
                           dedup_key=f"reconcile:{m['user_id']}:{ran_at.isoformat()}")
    return {"ran_at": ran_at.isoformat(), "accounts_checked": checked, "mismatches": mismatches}


def last_run() -> dict:
    """The most recent run, or an empty one if reconciliation never ran."""
    r = db.session.scalar(select(ReconciliationRun).order_by(ReconciliationRun.id.desc())
                          .limit(1))
    if r is None:
        return {"ran_at": None, "accounts_checked": 0, "mismatches": []}
    return {"ran_at": r.ran_at.isoformat(), "accounts_checked": r.accounts_checked,
            "mismatches": r.mismatches}
