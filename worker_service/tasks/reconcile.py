"""txmon.reconcile: balance == sum of ledger and gapless seq, for every account."""
from __future__ import annotations

from celery import shared_task

from shared import reconcile


@shared_task(name="txmon.reconcile.run", max_retries=2, time_limit=3600, soft_time_limit=3500)
def run() -> dict:
    """Check every account in batches; mismatches become alerts (see shared/reconcile.py)."""
    result = reconcile.run()
    return {"accounts_checked": result["accounts_checked"],
            "mismatches": len(result["mismatches"])}
