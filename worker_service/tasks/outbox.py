"""txmon.outbox: the safety net behind the relay loops, and the outbox's retention."""
from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task, current_app as current_celery
from flask import current_app

from shared import outbox
from shared.db import utcnow
from worker_service.relay import drain

log = logging.getLogger("txmon.outbox")


@shared_task(name="txmon.outbox.sweep", max_retries=0, time_limit=60, soft_time_limit=50)
def sweep() -> int:
    """Dispatch rows left behind (a crash after commit, the broker down) and rows whose
    message or worker was lost (dispatched, not started or not finished within the lease)."""
    return drain(current_celery._get_current_object()) + drain(
        current_celery._get_current_object(), lapsed=True)


@shared_task(name="txmon.outbox.purge", max_retries=0, time_limit=600, soft_time_limit=540)
def purge(batches: int = 100, size: int = outbox.PURGE_BATCH) -> int:
    """Delete rows completed more than TXMON_OUTBOX_KEEP_DAYS ago, ``size`` per transaction
    (a queue table otherwise grows by every follow-up ever done); returns how many."""
    days = current_app.config["OUTBOX_KEEP_DAYS"]
    if days <= 0:
        return 0
    before, deleted = utcnow() - timedelta(days=days), 0
    for _ in range(batches):
        n = outbox.purge_completed(before, limit=size)
        deleted += n
        if n < size:
            break
    if deleted:
        log.info("Outbox rows completed before %s deleted: %s", before.isoformat(), deleted)
    return deleted
