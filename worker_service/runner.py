"""The batch runner: the one place where outbox rows are run, completed, retried and
dead-lettered.

``@handles(outbox.SOMETHING)`` turns a batch body into the Celery task of that handler
(its name and queue from shared/outbox.py's registry, so Flower lists every handler). The
task receives outbox ids; the runner leases the rows still to do (a duplicate message
finds them leased or done and runs nothing), keeps the lease alive while the body works,
then completes the rows that succeeded in one statement and schedules the others per the
handler's backoff, dead once their attempts are spent.

A body takes the leased rows (``id``, ``payload``, ``attempts``) and returns, per row id,
a result or the exception that row failed with; an exception raised by the body fails the
whole batch. A row whose data is gone is a result, not a failure.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Callable

from celery import shared_task

from shared import outbox
from shared.db import db

log = logging.getLogger("txmon.runner")
BODIES: dict[str, Callable] = {}
ON_DEAD: dict[str, Callable] = {}


def handles(name: str, *, on_dead: Callable | None = None):
    """Register ``body`` as the batch body of handler ``name``; returns its Celery task.
    ``on_dead(rows)`` runs for rows whose attempts are spent."""
    spec = outbox.HANDLERS[name]

    def register(body: Callable):
        BODIES[name] = body
        if on_dead is not None:
            ON_DEAD[name] = on_dead

        @shared_task(name=name, queue=spec.queue, max_retries=0, autoretry_for=(),
                     time_limit=outbox.RUN_LEASE_S * 4, soft_time_limit=outbox.RUN_LEASE_S * 3)
        def task(outbox_ids: list[int]) -> dict:
            return run(name, outbox_ids)

        task.__doc__ = body.__doc__
        return task

    return register


def run(name: str, outbox_ids: list[int]) -> dict:
    """Run handler ``name`` on the rows of ``outbox_ids`` still to do (see module doc)."""
    rows = outbox.start(list(outbox_ids))
    if not rows:
        return {"ran": 0, "skipped": len(outbox_ids)}
    with _Lease(db.engine, [r.id for r in rows]):
        try:
            results = BODIES[name](rows)
        except Exception as exc:
            log.warning("Handler %s failed for its batch of %s rows (%s: %s)", name, len(rows),
                        type(exc).__name__, exc)
            results = {r.id: exc for r in rows}
        finally:
            db.session.remove()  # SQLite: a session's open transaction holds the write lock
    failed = [(r, results[r.id]) for r in rows if isinstance(results.get(r.id), BaseException)]
    later = [r for r in rows if isinstance(results.get(r.id), outbox.Postpone)]
    for seconds in sorted({results[r.id].seconds for r in later}):
        outbox.postpone([r for r in later if results[r.id].seconds == seconds], seconds)
    outbox.complete([r.id for r in rows if not isinstance(results.get(r.id),
                                                          (BaseException, outbox.Postpone))])
    if failed:
        dead = set(outbox.fail(name, [(r, f"{type(e).__name__}: {e}") for r, e in failed]))
        hook = ON_DEAD.get(name)
        if dead and hook is not None:
            hook([(r, e) for r, e in failed if r.id in dead])
    outcomes = Counter()
    for r in rows:  # one line per row, in the form of Celery's own line per task
        result = results.get(r.id)
        if isinstance(result, BaseException):
            log.warning("Task %s[outbox:%s] failed (attempt %s): %s: %s", name, r.id, r.attempts,
                        type(result).__name__, result)
            outcomes["failed"] += 1
        else:
            log.info("Task %s[outbox:%s] succeeded: %r", name, r.id, result)
            outcomes[str(result)] += 1
    return {"ran": len(rows), "skipped": len(outbox_ids) - len(rows), **outcomes}


class _Lease:
    """Extends the rows' lease every third of it while the body runs (a stuck SMTP server
    holds the batch, not the row's promise: a dead worker's rows lapse within the lease)."""

    def __init__(self, engine, ids: list[int]):
        self.engine, self.ids = engine, ids
        self.stopping = threading.Event()

    def _keep(self) -> None:
        while not self.stopping.wait(outbox.RUN_LEASE_S / 3):
            try:
                outbox.extend(self.engine, self.ids)
            except Exception as exc:  # the database is away: the rows lapse, run again
                log.warning("Could not extend the lease of %s outbox rows (%s)", len(self.ids),
                            type(exc).__name__)

    def __enter__(self):
        threading.Thread(target=self._keep, name="outbox-lease", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
