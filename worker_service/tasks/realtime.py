"""txmon.realtime: publish committed balance changes and alerts on Redis pub/sub."""
from __future__ import annotations

from shared import alerts, realtime
from shared.db import db, utcnow
from shared.ledger import serialize_transaction
from shared.models import Alert, Transaction
from worker_service.celery_app import celery


@celery.task(name="txmon.realtime.publish_balance")
def publish_balance(transaction_id: int) -> bool:
    """Publish the transaction's balance_update to its owner's channel and the admin feed."""
    tx = db.session.get(Transaction, transaction_id)
    if tx is None:
        return False
    message = realtime.balance_update(serialize_transaction(tx), utcnow().isoformat())
    realtime.publish(realtime.user_channel(tx.user_id), message)
    realtime.publish(realtime.ADMIN_CHANNEL, message)
    return True


@celery.task(name="txmon.realtime.publish_alert")
def publish_alert(alert_id: int) -> bool:
    """Publish an alert on the admin feed."""
    alert = db.session.get(Alert, alert_id)
    if alert is None:
        return False
    realtime.publish(realtime.ADMIN_CHANNEL, {"type": "alert", "alert": alerts.serialize(alert)})
    return True
