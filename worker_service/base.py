"""The base task: an app context and a clean session per run, metrics, and retry policy.

Outbox handlers (worker_service/runner.py) retry through the outbox's own schedule and set
``max_retries=0``. The other tasks (sweeps, scans, reconciliation) retry transient
failures (database, Redis) with exponential backoff and jitter, at most ``max_retries``
times.
"""
from __future__ import annotations

import socket
import time

import redis
from celery import Task
from celery.exceptions import Retry
from sqlalchemy.exc import OperationalError

from shared.db import db
from worker_service.worker_metrics import TASK_RUNS, TASK_SECONDS

TRANSIENT = (OperationalError, redis.ConnectionError, redis.TimeoutError, socket.timeout,
             ConnectionError, TimeoutError)


class TxmonTask(Task):
    abstract = True
    acks_late = True
    autoretry_for = TRANSIENT
    retry_backoff = 2
    retry_backoff_max = 300
    retry_jitter = True
    max_retries = 8

    def __call__(self, *args, **kwargs):
        started = time.monotonic()
        outcome = "ok"
        with self.app.flask_app.app_context():
            try:
                return self.run(*args, **kwargs)
            except Retry:
                outcome = "retry"
                raise
            except Exception:
                outcome = "error"
                raise
            finally:
                db.session.remove()
                TASK_RUNS.labels(task=self.name, outcome=outcome).inc()
                TASK_SECONDS.labels(task=self.name).observe(time.monotonic() - started)
