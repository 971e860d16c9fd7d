"""txmon.notifications: delivery of notifications, push to the user's channel and email.

``deliver_all`` (the outbox row every notification gets) pushes and emails in one run and
one database transaction. ``deliver`` (push only) stays registered for rows written before
``deliver_all`` existed, as does txmon.email.send_notification, which is also where an
email that failed inside ``deliver_all`` goes for its retries.
"""
from __future__ import annotations

import logging

from shared import delivery, outbox
from worker_service.base import PERMANENT, TRANSIENT, HandedOff, current_run
from worker_service.celery_app import celery

log = logging.getLogger("txmon.notifications")
EMAIL_RETRY_COUNTDOWN_S = 2


@celery.task(name="txmon.notifications.deliver")
def deliver(notification_id: int) -> str:
    """Publish the notification if the user's push preferences want it."""
    return delivery.push(notification_id=notification_id)


@celery.task(name="txmon.notifications.deliver_all", bind=True)
def deliver_all(self, notification_id: int) -> str:
    """Push (if wanted) and email (if wanted) one notification; see delivery.deliver.

    The outbox row is completed in the delivery's own commit. If the email fails, the push
    stands and the email goes on as txmon.email.send_notification (with the same outbox row
    and the email retry policy: backoff, then ``failed`` plus, for a refund, the CRITICAL
    line and an alert); a permanent refusal is final at once. If the push keeps failing
    until retries are spent, the email is still sent and the push counted as failed.
    """
    from worker_service.tasks.email import give_up

    run = current_run()
    try:
        result = delivery.deliver(notification_id=notification_id, outbox_id=run.outbox_id)
    except delivery.EmailFailed as failed:
        exc = failed.__cause__
        if isinstance(exc, PERMANENT):
            give_up(notification_id, exc)
            return f"push={failed.args[0]} email=failed"
        _hand_off_email(notification_id, run.outbox_id, exc)
        raise HandedOff() from exc
    except TRANSIENT:
        if not self.retries_exhausted:
            raise
        log.warning("Push of notification %s failed for good; sending the email only",
                    notification_id)
        try:
            result = delivery.deliver(notification_id=notification_id,
                                      outbox_id=run.outbox_id, push_failed=True)
        except delivery.EmailFailed as failed:
            give_up(notification_id, failed.__cause__)
            return "push=failed email=failed"
    run.completed = result["completed"]
    return f"push={result['push']} email={result['email']}"


def _hand_off_email(notification_id: int, outbox_id: int | None, exc: Exception) -> None:
    """Send the email as its own task; the outbox row stays open until that task ends (if
    this send is lost, the sweep sends the row again after its lease)."""
    log.info("Email of notification %s failed (%s); retrying it on its own", notification_id,
             type(exc).__name__)
    kwargs = {"notification_id": notification_id}
    if outbox_id is not None:
        kwargs["outbox_id"] = outbox_id
    try:
        celery.send_task(outbox.SEND_EMAIL, kwargs=kwargs, countdown=EMAIL_RETRY_COUNTDOWN_S,
                         retry=False)
    except Exception as send_exc:
        if outbox_id is None:
            raise exc from send_exc
        log.warning("Could not queue the email retry of notification %s (%s); the outbox "
                    "sweep will send row %s again", notification_id, type(send_exc).__name__,
                    outbox_id)
