"""txmon.notifications: push a notification to its owner's realtime channel."""
from __future__ import annotations

from shared import delivery, outbox
from worker_service.runner import handles
from worker_service.tasks import ids_of


def deliver_rows(channel: str, rows) -> dict:
    """Deliver the notifications named by outbox ``rows`` on ``channel``; per row, its
    outcome or exception."""
    good, bad = ids_of(rows, "notification_id")
    outcome = delivery.deliver(channel, sorted(set(good.values()))) if good else {}
    return {**bad, **{row_id: outcome[nid] for row_id, nid in good.items()}}


def give_up(failed) -> None:
    """Pushes whose attempts are spent: their delivery is failed."""
    ids = [row.payload.get("notification_id") for row, _ in failed
           if isinstance(row.payload, dict)]
    delivery.mark_failed("push", notification_ids=[i for i in ids if isinstance(i, int)])


@handles(outbox.PUSH, on_dead=give_up)
def push(rows) -> dict:
    """Publish each notification the user's push preferences want, one Redis pipeline."""
    return deliver_rows("push", rows)
