"""The base task: an app context and a clean session per run, metrics, and retry policy.

Transient failures (database, Redis, SMTP connection trouble) are retried with exponential
backoff and jitter, at most ``max_retries`` times, so a poisoned task cannot loop forever.
``PermanentError`` (and any other exception) is not retried.
"""
from __future__ import annotations

import smtplib
import socket
import time

import redis
from celery import Task
from celery.exceptions import Retry
from sqlalchemy.exc import OperationalError

from shared import outbox
from shared.db import db
from worker_service.worker_metrics import TASK_RUNS, TASK_SECONDS


class PermanentError(Exception):
    """A failure retrying cannot fix (bad data, a row that can never qualify)."""


# Checked before TRANSIENT (they are SMTPException subclasses): retrying cannot help.
PERMANENT = (PermanentError, smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused)
TRANSIENT = (OperationalError, redis.ConnectionError, redis.TimeoutError, smtplib.SMTPException,
             socket.timeout, ConnectionError, TimeoutError)


class TxmonTask(Task):
    abstract = True
    acks_late = True
    autoretry_for = TRANSIENT
    dont_autoretry_for = PERMANENT
    retry_backoff = 2
    retry_backoff_max = 300
    retry_jitter = True
    max_retries = 8

    def __call__(self, *args, **kwargs):
        outbox_id = kwargs.pop("outbox_id", None)
        started = time.monotonic()
        outcome = "ok"
        with self.app.flask_app.app_context():
            try:
                result = self.run(*args, **kwargs)
            except Retry:
                outcome = "retry"
                raise
            except Exception:
                outcome = "error"
                raise
            else:
                if outbox_id is not None:
                    outbox.mark_completed(outbox_id)
                return result
            finally:
                db.session.remove()
                TASK_RUNS.labels(task=self.name, outcome=outcome).inc()
                TASK_SECONDS.labels(task=self.name).observe(time.monotonic() - started)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        """Final failure (retries spent or a permanent error): the outbox row is finished
        too, so the sweep does not send a poisoned task forever."""
        outbox_id = (kwargs or {}).get("outbox_id")
        if outbox_id is not None:
            with self.app.flask_app.app_context():
                outbox.mark_completed(outbox_id)

    @property
    def retries_exhausted(self) -> bool:
        """True on the last attempt the retry policy allows."""
        return self.request.retries >= self.max_retries
