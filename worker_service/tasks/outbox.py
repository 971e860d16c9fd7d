"""txmon.outbox: the relay's safety net and the backlog gauge."""
from __future__ import annotations

from worker_service.celery_app import celery
from worker_service.relay import drain
from shared import outbox
from shared.metrics import OUTBOX_BACKLOG


@celery.task(name="txmon.outbox.sweep", max_retries=0, time_limit=60, soft_time_limit=50)
def sweep() -> int:
    """Dispatch outbox rows left behind (crash after commit, Redis down); update the gauge."""
    sent = drain(celery)
    OUTBOX_BACKLOG.set(outbox.backlog())
    return sent
