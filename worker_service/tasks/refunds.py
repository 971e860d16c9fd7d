"""txmon.refunds: refund verifications that reached expires_at while pending."""
from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select

from shared import ledger
from shared.db import db, utcnow
from shared.errors import InvalidState, NotFound
from shared.models import Verification
from worker_service.celery_app import celery

log = logging.getLogger("txmon.refunds")
BATCH = 200


def _expire(verification_id: str) -> str:
    try:
        m = ledger.refund_verification(verification_id=verification_id, status="timed_out",
                                       reason="timed out")
    except (InvalidState, NotFound):
        return "ended"  # completed, cancelled or failed first: nothing to refund
    return "refunded" if m.created else "already"


@celery.task(name="txmon.refunds.expire_verification", bind=True)
def expire_verification(self, verification_id: str) -> str:
    """The countdown task scheduled at purchase; refunds once if still pending."""
    try:
        ver = ledger.get_verification(verification_id=verification_id)
    except NotFound:
        return "ended"
    if ver["status"] != "pending":
        return "ended"
    remaining = (datetime.fromisoformat(ver["expires_at"]) - utcnow()).total_seconds()
    if remaining > 0:  # delivered early (clock skew): come back at expiry
        raise self.retry(countdown=remaining, max_retries=self.max_retries + 1)
    return _expire(verification_id)


@celery.task(name="txmon.refunds.expire_batch")
def expire_batch(verification_ids: list[str]) -> int:
    """Refund a batch of expired verifications; returns how many this run refunded."""
    return sum(_expire(v) == "refunded" for v in verification_ids)


@celery.task(name="txmon.refunds.scan_expired", max_retries=0, time_limit=110)
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
