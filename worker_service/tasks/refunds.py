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

log = logging.getLogger("txmon.refunds")
_v = Verification.__table__
BATCH = 200


def expire(verification_ids: list[str]) -> dict[str, object]:
    """Refund each verification still pending past its expiry, once; per id "refunded",
    "already", "ended" (completed, cancelled or failed first, or gone), an outbox.Postpone
    (not expired yet: nothing refunded) or the exception its refund raised. One query loads
    them all; each refund is its own commit on one account (DESIGN "Scaling out")."""
    with db.engine.connect() as conn:
        found = {v.id: v for v in conn.execute(select(_v).where(_v.c.id.in_(verification_ids)))}
    now = utcnow()
    return {vid: _refund(found[vid], now)
            if vid in found and found[vid].status in ("pending", "timed_out") else "ended"
            for vid in verification_ids}


def _refund(ver, now) -> object:
    try:
        m = ledger.refund_verification(verification_id=ver.id, status="timed_out",
                                       reason="timed out", ver=ver)
        return "refunded" if m.created else "already"
    except ledger.NotYetExpired as exc:
        return outbox.Postpone(max(1.0, (exc.expires_at - now).total_seconds()))
    except (InvalidState, NotFound):
        return "ended"
    except Exception as exc:
        return exc


@handles(outbox.EXPIRE_VERIFICATION)
def expire_verification(rows) -> dict:
    """Refund each verification of the batch that is still pending (its row is due at
    expiry); a row before its verification's expiry waits until then."""
    good, results = {}, {}
    for row in rows:
        vid = row.payload.get("verification_id") if isinstance(row.payload, dict) else None
        if isinstance(vid, str):
            good[row.id] = vid
        else:
            results[row.id] = ValueError(f"not a verification id: {vid!r}")
    outcome = expire(sorted(set(good.values()))) if good else {}
    results.update({row_id: outcome[vid] for row_id, vid in good.items()})
    return results


@shared_task(name="txmon.refunds.expire_batch")
def expire_batch(verification_ids: list[str]) -> int:
    """Refund a batch of expired verifications; returns how many this run refunded."""
    return sum(r == "refunded" for r in expire(list(verification_ids)).values())


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
