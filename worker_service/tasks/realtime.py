"""txmon.realtime: publish committed balance changes and alerts on Redis pub/sub."""
from __future__ import annotations

import json

from flask import current_app
from sqlalchemy import select

from shared import alerts, outbox, realtime
from shared.db import db, utcnow
from shared.ledger import serialize_transaction
from shared.models import Alert, Transaction
from shared.redis_client import client
from worker_service.runner import handles
from worker_service.tasks import ids_of


def _publish(messages: list[tuple[str, dict | str]]) -> None:
    pipe = client(current_app.config["REDIS_URL"]).pipeline(transaction=False)
    for channel, message in messages:
        pipe.publish(channel, message if isinstance(message, str) else json.dumps(message))
    pipe.execute()


@handles(outbox.PUBLISH_BALANCE)
def publish_balance(rows) -> dict:
    """Publish each transaction's balance_update to its owner and the admin feed (the
    message the ledger stored, else built from the transaction), in one pipeline. On
    Postgres the relay publishes these itself; this runs them on SQLite."""
    results, messages, missing = {}, [], {}
    for row in rows:
        message = row.payload.get("message") if isinstance(row.payload, dict) else None
        if isinstance(message, dict) and "transaction" in message:
            messages.append((message["transaction"]["user_id"], message))
            results[row.id] = True
        else:
            missing[row.id] = row
    good, bad = ids_of(list(missing.values()), "transaction_id")
    results.update(bad)
    if good:
        found = {tx.id: tx for tx in db.session.scalars(
            select(Transaction).where(Transaction.id.in_(set(good.values()))))}
        for row_id, tx_id in good.items():
            tx = found.get(tx_id)
            results[row_id] = tx is not None
            if tx is not None:
                messages.append((tx.user_id, realtime.balance_update(serialize_transaction(tx),
                                                                     utcnow().isoformat())))
    _publish([pair for user_id, m in messages
              for pair in ((realtime.user_channel(user_id), m), (realtime.ADMIN_CHANNEL, m))])
    return results


@handles(outbox.PUBLISH_ALERT)
def publish_alert(rows) -> dict:
    """Publish each alert on the admin feed, in one pipeline."""
    good, results = ids_of(rows, "alert_id")
    found = {a.id: a for a in db.session.scalars(
        select(Alert).where(Alert.id.in_(set(good.values()))))} if good else {}
    _publish([(realtime.ADMIN_CHANNEL, {"type": "alert", "alert": alerts.serialize(found[a])})
              for a in good.values() if a in found])
    results.update({row_id: a in found for row_id, a in good.items()})
    return results
