"""The base task: an app context and a clean session per run, metrics, and retry policy.

Transient failures (database, Redis, SMTP connection trouble) are retried with exponential
backoff and jitter, at most ``max_retries`` times, so a poisoned task cannot loop forever.
``PermanentError`` (and any other exception) is not retried.

A task started from an outbox row carries ``outbox_id``; the row is marked completed when
the task has run (or failed for the last time). ``run_item`` is the same run without a
Celery message of its own: the relay packs many rows into one ``txmon.outbox.run_batch``
task (worker_service/tasks/outbox.py), which runs each row's task through it.
"""
from __future__ import annotations

import contextvars
import smtplib
import socket
import time
from dataclasses import dataclass

import redis
from celery import Task
from celery.exceptions import Retry
from sqlalchemy.exc import OperationalError

from shared import outbox
from shared.db import db
from worker_service.worker_metrics import TASK_RUNS, TASK_SECONDS


class PermanentError(Exception):
    """A failure retrying cannot fix (bad data, a row that can never qualify)."""


class HandedOff(Exception):
    """Raised by a task that passed the rest of its work (and its outbox row) to another
    task: this run ends without error and without completing the row."""


# Checked before TRANSIENT (they are SMTPException subclasses): retrying cannot help.
PERMANENT = (PermanentError, smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused)
TRANSIENT = (OperationalError, redis.ConnectionError, redis.TimeoutError, smtplib.SMTPException,
             socket.timeout, ConnectionError, TimeoutError)


@dataclass
class RunContext:
    """The outbox row of the run in progress. A task that marks the row completed inside its
    own database transaction sets ``completed`` (nothing more to write afterwards)."""

    outbox_id: int | None
    completed: bool = False


_current: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "txmon_run", default=None)


def current_run() -> RunContext:
    """The run in progress (a context without a row outside of one)."""
    return _current.get() or RunContext(None)


def run_item(task: Task, args: tuple, kwargs: dict, *,
             complete: bool = True) -> tuple[str, object, int | None]:
    """Run ``task``'s body inside the app context (the caller enters it), ``outbox_id``
    popped from ``kwargs``.

    Returns (outcome, result, row left to complete): outcome "ok", or "handed_off" when
    another task now owns the row. With ``complete`` the row is marked completed here;
    without, its id is returned for the caller to complete (a batch does all of its rows in
    one statement). Raises what the task raised; the session is always cleaned up and
    metrics are recorded.
    """
    kwargs = dict(kwargs)
    ctx = RunContext(kwargs.pop("outbox_id", None))
    token = _current.set(ctx)
    started = time.monotonic()
    outcome = "ok"
    try:
        try:
            result = task.run(*args, **kwargs)
        except HandedOff:
            outcome = "handed_off"
            return outcome, None, None
        except Retry:
            outcome = "retry"
            raise
        except Exception:
            outcome = "error"
            raise
        left = ctx.outbox_id if ctx.outbox_id is not None and not ctx.completed else None
        if left is not None and complete:
            outbox.mark_completed(left)
            left = None
        return outcome, result, left
    finally:
        _current.reset(token)
        db.session.remove()
        TASK_RUNS.labels(task=task.name, outcome=outcome).inc()
        TASK_SECONDS.labels(task=task.name).observe(time.monotonic() - started)


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
        with self.app.flask_app.app_context():
            return run_item(self, args, kwargs)[1]

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
