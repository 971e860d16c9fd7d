"""txmon.refunds: refund verifications that reached expires_at while pending.

Each purchase writes an outbox row due at its verification's expiry: the wait is a due
time in the database, never a countdown held by the broker or a worker.
"""
from __future__ import annotations

import logging

from celery import shared_task
from sqlalchemy import select

from shared import ledger, outbox
from shared.db import db, utcnow
from shared.errors import InvalidState, NotFound
from shared.models import Verification
from worker_service.runner import handles
from worker_service.tasks import each

log = logging.getLogger("txmon.refunds")
BATCH = 200


def expire(verification_id: str) -> str:
    """Refund the verification once if it is still pending."""
    if not isinstance(verification_id, str):
        raise ValueError(f"not a verification id: {verification_id!r}")
    try:
        m = ledger.refund_verification(verification_id=verification_id, status="timed_out",
                                       reason="timed out")
    except (InvalidState, NotFound):
        return "ended"  # completed, cancelled or failed first: nothing to refund
    return "refunded" if m.created else "already"


@handles(outbox.EXPIRE_VERIFICATION)
def expire_verification(rows) -> dict:
    """Refund each verification of the batch that is still pending (its row is due at
    expiry)."""
    return each(rows, "verification_id", expire)


@shared_task(name="txmon.refunds.expire_batch")
def expire_batch(verification_ids: list[str]) -> int:
    """Refund a batch of expired verifications; returns how many this run refunded."""
    return sum(expire(v) == "refunded" for v in verification_ids)


@shared_task(name="txmon.refunds.scan_expired", max_retries=0, time_limit=110)
def scan_expired(limit: int = 50_000) -> int:
    """Beat safety net: fan out every pending verification past expiry, in batches."""
    now = utcnow()
    after, queued = "", 0
    while queued < limit:
        # A short read per batch: on SQLite an open transaction holds the write lock.
        with db.engine.connect() as conn:
            ids = conn.execute(
                select(Verification.id).where(Verification.status == "pending",
                                              Verification.expires_at <= now,
                                              Verification.id > after)
                .order_by(Verification.id).limit(BATCH)).scalars().all()
        if not ids:
            break
        expire_batch.delay(ids)
        queued += len(ids)
        after = ids[-1]
    if queued:
        log.info("Expired verifications queued for refund: %s", queued)
    return queued
