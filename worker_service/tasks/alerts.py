"""txmon.alerts: run the suspicious-activity rules on a committed transaction."""
from __future__ import annotations

from flask import current_app
from sqlalchemy import select

from shared import alert_rules, alerts
from shared.db import db
from shared.models import Transaction

transactions = Transaction.__table__
from worker_service.celery_app import celery


@celery.task(name="txmon.alerts.check_transaction")
def check_transaction(transaction_id: int) -> list[str]:
    """Evaluate every rule; store (deduplicated) alerts; returns the rules that fired."""
    # A Core row (the rules read attributes only): no ORM identity-map work per check.
    tx = db.session.connection().execute(
        select(transactions).where(transactions.c.id == transaction_id)).first()
    if tx is None:
        return []
    fired = []
    findings = alert_rules.evaluate(tx, current_app.config)
    user_id, tx_id = tx.user_id, tx.id
    db.session.close()  # alerts write on their own connection (SQLite: one writer at a time)
    for finding in findings:
        if finding.once_while_open and alerts.open_alert_exists(rule=finding.rule,
                                                                user_id=user_id):
            continue
        _, created = alerts.raise_alert(rule=finding.rule, user_id=user_id,
                                        transaction_id=tx_id, details=finding.details,
                                        dedup_key=finding.dedup_key)
        if created:
            fired.append(finding.rule)
    return fired
