"""txmon.reconcile: balance == sum of ledger and gapless seq, for every account; the admin
monitor's roll-ups."""
from __future__ import annotations

from celery import shared_task

from shared import reconcile, rollups


@shared_task(name="txmon.reconcile.run", max_retries=2, time_limit=3600, soft_time_limit=3500)
def run() -> dict:
    """Check every account in batches; mismatches become alerts (see shared/reconcile.py)."""
    result = reconcile.run()
    return {"accounts_checked": result["accounts_checked"],
            "mismatches": len(result["mismatches"])}


@shared_task(name="txmon.reconcile.monitor_rollups", max_retries=0, time_limit=120,
             soft_time_limit=100)
def monitor_rollups() -> dict:
    """Roll transactions up for the admin monitor, by id above the watermark
    (shared/rollups.py); every 30 s from beat, idempotent, one run at a time."""
    return rollups.run()
