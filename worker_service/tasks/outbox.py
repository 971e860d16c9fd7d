"""txmon.outbox: the relay's safety net and the backlog gauge."""
from __future__ import annotations

from flask import current_app

from worker_service.celery_app import celery
from worker_service.relay import drain


@celery.task(name="txmon.outbox.sweep", max_retries=0, time_limit=60, soft_time_limit=50)
def sweep() -> int:
    """Dispatch outbox rows left behind (crash after commit, Redis down) and send again
    those whose task never finished within the lease (a message the broker lost)."""
    return drain(celery, lease_s=current_app.config["OUTBOX_LEASE_S"])
