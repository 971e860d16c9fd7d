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
from sqlalchemy.exc import OperationalError

from shared.db import db
from worker_service.worker_metrics import TASK_RUNS, TASK_SECONDS


class PermanentError(Exception):
    """A failure retrying cannot fix (bad data, a row that can never qualify)."""


TRANSIENT = (OperationalError, redis.ConnectionError, redis.TimeoutError, smtplib.SMTPException,
             socket.timeout, ConnectionError, TimeoutError)


class TxmonTask(Task):
    abstract = True
    acks_late = True
    autoretry_for = TRANSIENT
    dont_autoretry_for = (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused)
    retry_backoff = 2
    retry_backoff_max = 300
    retry_jitter = True
    max_retries = 8

    def __call__(self, *args, **kwargs):
        started = time.monotonic()
        outcome = "ok"
        with self.app.flask_app.app_context():
            try:
                return super().__call__(*args, **kwargs)
            except Exception:
                outcome = "error"
                raise
            finally:
                db.session.remove()
                TASK_RUNS.labels(task=self.name, outcome=outcome).inc()
                TASK_SECONDS.labels(task=self.name).observe(time.monotonic() - started)

    @property
    def retries_exhausted(self) -> bool:
        """True on the last attempt the retry policy allows."""
        return self.request.retries >= self.max_retries
