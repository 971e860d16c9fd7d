"""txmon.outbox: the safety net behind the relay loops."""
from __future__ import annotations

from celery import shared_task, current_app as current_celery

from worker_service.relay import drain


@shared_task(name="txmon.outbox.sweep", max_retries=0, time_limit=60, soft_time_limit=50)
def sweep() -> int:
    """Dispatch rows left behind (a crash after commit, the broker down) and rows whose
    message or worker was lost (dispatched, not started or not finished within the lease)."""
    return drain(current_celery._get_current_object()) + drain(
        current_celery._get_current_object(), lapsed=True)
