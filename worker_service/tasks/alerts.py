"""txmon.alerts: run the suspicious-activity rules on a committed transaction."""
from __future__ import annotations

from flask import current_app
from sqlalchemy import bindparam, select

from shared import alert_rules, alerts
from shared.db import db
from shared.models import Transaction

transactions = Transaction.__table__
from worker_service.celery_app import celery


_BY_ID = select(transactions).where(transactions.c.id == bindparam("id"))
_READS = {"postgresql": {"isolation_level": "AUTOCOMMIT"}}


@celery.task(name="txmon.alerts.check_transaction")
def check_transaction(transaction_id: int) -> list[str]:
    """Evaluate every rule; store (deduplicated) alerts; returns the rules that fired."""
    # A Core row (the rules read attributes only): no ORM identity-map work per check. The
    # reads share the session's connection, on Postgres in autocommit: each is a statement
    # of its own and none needs to see the others' snapshot, so no BEGIN and ROLLBACK
    # round trips (two of a check's four). Not on SQLite: there SQLAlchemy's reset after
    # autocommit turns pysqlite's own transaction handling back on for the pooled
    # connection (shared/db.py turns it off). Alerts are written after it is closed, on
    # their own (SQLite: one writer at a time).
    conn = db.session.connection(execution_options=_READS.get(db.engine.dialect.name))
    tx = conn.execute(_BY_ID, {"id": transaction_id}).first()
    if tx is None:
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
