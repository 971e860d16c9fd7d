"""txmon.alerts: run the suspicious-activity rules on committed transactions."""
from __future__ import annotations

from flask import current_app
from sqlalchemy import bindparam, select

from shared import alert_rules, alerts, outbox
from shared.db import db
from shared.models import Transaction
from worker_service.runner import handles
from worker_service.tasks import ids_of

transactions = Transaction.__table__
_BY_IDS = select(transactions).where(transactions.c.id.in_(bindparam("ids", expanding=True)))
_READS = {"postgresql": {"isolation_level": "AUTOCOMMIT"}}


def check_batch(transaction_ids: list[int]) -> dict[int, object]:
    """Evaluate every rule on the transactions (one query per rule for the whole batch);
    store (deduplicated) alerts. Per id: the rules that fired, "gone" (no such
    transaction), or the exception storing its alert raised."""
    # Core rows (the rules read attributes only). On Postgres the reads run in autocommit
    # (no BEGIN and ROLLBACK round trips); not on SQLite, where SQLAlchemy's reset after
    # autocommit turns pysqlite's own transaction handling back on (shared/db.py turns it
    # off). Alerts are written after the reads' connection is closed (SQLite: one writer).
    conn = db.session.connection(execution_options=_READS.get(db.engine.dialect.name))
    txs = conn.execute(_BY_IDS, {"ids": list(transaction_ids)}).all()
    findings = alert_rules.evaluate(txs, current_app.config)
    users = {tx.id: tx.user_id for tx in txs}
    keys = {f"{f.rule}:{users[tx_id]}" for tx_id, fs in findings.items() for f in fs
            if f.once_while_open}
    already_open = alerts.open_keys(keys, conn=conn) if keys else set()
    db.session.close()
    results: dict[int, object] = {i: "gone" for i in transaction_ids}
    for tx_id, found in findings.items():
        fired = []
        try:
            for finding in found:
                if finding.once_while_open and f"{finding.rule}:{users[tx_id]}" in already_open:
                    continue
                _, created = alerts.raise_alert(rule=finding.rule, user_id=users[tx_id],
                                                transaction_id=tx_id, details=finding.details,
                                                dedup_key=finding.dedup_key,
                                                once_while_open=finding.once_while_open)
                if created:
                    fired.append(finding.rule)
            results[tx_id] = fired
        except Exception as exc:  # this transaction's alert only: the batch goes on
            results[tx_id] = exc
    return results


def check(transaction_id: int) -> list[str]:
    """Evaluate every rule on one transaction; returns the rules that fired."""
    result = check_batch([transaction_id])[transaction_id]
    if isinstance(result, Exception):
        raise result
    return [] if result == "gone" else result


@handles(outbox.CHECK_ALERTS)
def check_transaction(rows) -> dict:
    """Check the batch's transactions: one query per rule for all of them."""
    good, results = ids_of(rows, "transaction_id")
    outcome = check_batch(sorted(set(good.values()))) if good else {}
    results.update({row_id: outcome[tx_id] for row_id, tx_id in good.items()})
    return results
