"""txmon.alerts: run the suspicious-activity rules on committed transactions."""
from __future__ import annotations

from flask import current_app
from sqlalchemy import bindparam, select

from shared import alert_rules, alerts, outbox
from shared.db import db
from shared.models import Transaction
from worker_service.runner import handles
from worker_service.tasks import each

transactions = Transaction.__table__
_BY_ID = select(transactions).where(transactions.c.id == bindparam("id"))
_READS = {"postgresql": {"isolation_level": "AUTOCOMMIT"}}


def check(transaction_id: int) -> list[str]:
    """Evaluate every rule on one transaction; store (deduplicated) alerts; returns the rules
    that fired."""
    # A Core row (the rules read attributes only). On Postgres the reads run in autocommit
    # (no BEGIN and ROLLBACK round trips); not on SQLite, where SQLAlchemy's reset after
    # autocommit turns pysqlite's own transaction handling back on (shared/db.py turns it
    # off). Alerts are written after the reads' connection is closed (SQLite: one writer).
    conn = db.session.connection(execution_options=_READS.get(db.engine.dialect.name))
    tx = conn.execute(_BY_ID, {"id": transaction_id}).first()
    if tx is None:
        db.session.close()
        return []
    user_id, tx_id = tx.user_id, tx.id
    findings = [f for f in alert_rules.evaluate(tx, current_app.config)
                if not (f.once_while_open
                        and alerts.open_alert_exists(rule=f.rule, user_id=user_id, conn=conn))]
    db.session.close()
    fired = []
    for finding in findings:
        _, created = alerts.raise_alert(rule=finding.rule, user_id=user_id,
                                        transaction_id=tx_id, details=finding.details,
                                        dedup_key=finding.dedup_key,
                                        once_while_open=finding.once_while_open)
        if created:
            fired.append(finding.rule)
    return fired


@handles(outbox.CHECK_ALERTS)
def check_transaction(rows) -> dict:
    """Check each transaction of the batch."""
    return each(rows, "transaction_id", check)
