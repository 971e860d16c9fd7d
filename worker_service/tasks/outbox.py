"""txmon.outbox: the relay's batches, its safety net and the backlog gauge."""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from celery.exceptions import SoftTimeLimitExceeded
from flask import current_app

from shared import outbox
from shared.db import db
from worker_service.base import TRANSIENT, run_item
from worker_service.celery_app import celery
from worker_service.relay import drain

log = logging.getLogger("txmon.outbox")
HAND_OFF_COUNTDOWN_S = 1


@celery.task(name="txmon.outbox.sweep", max_retries=0, time_limit=60, soft_time_limit=50)
def sweep() -> int:
    """Dispatch outbox rows left behind (crash after commit, Redis down) and send again
    those whose task never finished within the lease (a message the broker lost)."""
    return drain(celery, lease_s=current_app.config["OUTBOX_LEASE_S"])


@celery.task(name="txmon.outbox.run_batch")
def run_batch(items: list) -> dict:
    """Run the tasks of several outbox rows, one after the other, in this one task.

    ``items`` are [task name, kwargs with outbox_id] as the relay claimed them (all of one
    queue). Each runs exactly as its own task would (worker_service/base.py ``run_item``);
    the rows that ran are marked completed together at the end. Rows already completed
    (this batch delivered again after a worker was lost) are skipped. A row whose task
    raises is not retried here: it is sent on as its own task, with that task's retry
    policy, and its row stays open until that task ends; after a transient failure (SMTP,
    Redis or the database in trouble) or the soft time limit, the rest of the batch is sent
    on the same way rather than tried here. Nothing is lost if that send fails too: the
    rows stay open and the sweep sends them again after their lease.

    The rows run in ``batch_lanes()`` lanes (threads of this child) when there are enough.
    """
    ids = [kwargs.get("outbox_id") for _, kwargs in items]
    still_open = outbox.open_ids([i for i in ids if i is not None])
    todo = [(name, kwargs) for name, kwargs in items
            if kwargs.get("outbox_id") is None or kwargs["outbox_id"] in still_open]
    skipped = len(items) - len(todo)
    lanes = batch_lanes()
    lanes = lanes if len(todo) >= 2 * lanes else 1
    parts = [todo[i::lanes] for i in range(lanes)]
    if lanes > 1:
        # The other lanes in threads of this child, each in its own app context (so its own
        # session and database connection) and with its own SMTP connection: a delivery
        # spends most of its time waiting on Postgres, Redis and SMTP round trips, and the
        # lanes overlap those waits (the GIL is released while waiting).
        futures = [_executor().submit(_run_lane, part) for part in parts[1:]]
        results = [_run_lane(parts[0], main=True)] + [f.result() for f in futures]
    else:
        results = [_run_lane(parts[0], main=True)]
    done = [i for r in results for i in r["done"]]
    if done:
        with db.engine.begin() as conn:
            outbox.mark_completed_many(conn, done)
    return {"ran": sum(r["ran"] for r in results), "skipped": skipped,
            "handed_off": sum(r["handed_off"] for r in results)}


_pool: dict = {}


def batch_lanes() -> int:
    """Lanes per batch: TXMON_BATCH_THREADS, else about two rows in flight per CPU over the
    whole pool (2 with the default pool of one process per CPU, 1 with -c 2 x CPUs or
    more: measured, more lanes than that only add switching), at most 4."""
    configured = os.environ.get("TXMON_BATCH_THREADS")
    if configured:
        return max(1, int(configured))
    pool = int(os.environ.get("TXMON_POOL_SIZE") or 0) or (os.cpu_count() or 1)
    return max(1, min(4, round(2 * (os.cpu_count() or 1) / pool)))


def _executor() -> ThreadPoolExecutor:
    """This process's lane threads (made after the fork, never inherited)."""
    if _pool.get("pid") != os.getpid():
        _pool.update(pid=os.getpid(), executor=ThreadPoolExecutor(
            max_workers=3, thread_name_prefix="batch-lane"))
    return _pool["executor"]


def _run_lane(items: list, main: bool = False) -> dict:
    """Run ``items`` one after the other (see ``run_batch``); returns what happened."""
    if main:
        return _run_items(items)
    with celery.flask_app.app_context():
        return _run_items(items)


def _run_items(items: list) -> dict:
    done: list[int] = []
    ran = handed_off = 0
    trouble = False
    for task_name, kwargs in items:
        outbox_id = kwargs.get("outbox_id")
        task = celery.tasks.get(task_name)
        if task is None or trouble:
            handed_off += _hand_off(task_name, kwargs)
            continue
        started = time.monotonic()
        try:
            outcome, result, left = run_item(task, (), kwargs, complete=False)
        except SoftTimeLimitExceeded:
            trouble = True
            handed_off += _hand_off(task_name, kwargs)
            continue
        except Exception as exc:
            log.warning("Batched task %s (outbox row %s) failed (%s); sending it on its own",
                        task_name, outbox_id, type(exc).__name__)
            trouble = isinstance(exc, TRANSIENT)
            handed_off += _hand_off(task_name, kwargs)
            continue
        ran += 1
        if log.isEnabledFor(logging.INFO):  # Celery's own line, for the row's task
            log.info("Task %s[outbox:%s] %s in %.4fs: %r", task_name, outbox_id,
                     "succeeded" if outcome == "ok" else outcome, time.monotonic() - started,
                     result)
        if left is not None:
            done.append(left)
    return {"done": done, "ran": ran, "handed_off": handed_off}


def _hand_off(task_name: str, kwargs: dict) -> int:
    try:
        celery.send_task(task_name, kwargs=kwargs, countdown=HAND_OFF_COUNTDOWN_S, retry=False)
        return 1
    except Exception as exc:  # the row stays open: the sweep sends it after its lease
        log.warning("Could not send %s (outbox row %s) on its own (%s); the outbox sweep "
                    "will send it again", task_name, kwargs.get("outbox_id"),
                    type(exc).__name__)
        return 0
