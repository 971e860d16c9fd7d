"""txmon.notifications: push delivery of in-app notifications to the user's channel."""
from __future__ import annotations

from shared import delivery
from worker_service.celery_app import celery


@celery.task(name="txmon.notifications.deliver")
def deliver(notification_id: int) -> str:
    """Publish the notification if the user's push preferences want it."""
    return delivery.push(notification_id=notification_id)
