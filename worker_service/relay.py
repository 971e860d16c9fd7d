"""The outbox relay: dispatches outbox rows to Celery as soon as their commit lands.

Runs as a thread in each worker's main process. On Postgres it LISTENs on the
``txmon_outbox`` channel (a trigger NOTIFYs at commit), so dispatch follows the commit
within milliseconds; on SQLite it polls. Any number of relays may run: rows are claimed
with SKIP LOCKED. The beat task ``txmon.outbox.sweep`` is the safety net.
"""
from __future__ import annotations

import logging
import threading

from celery import bootsteps

log = logging.getLogger("txmon.relay")
POLL_S = 0.25


def send_with(celery_app):
    """The ``send`` callback for shared.outbox.claim_and_dispatch, over ``celery_app``.

    Balance updates that carry their message are published straight to Redis pub/sub
    (no task hop: this is the websocket's latency path); everything else becomes a task.
    """
    from shared import outbox, realtime

    def send(task: str, kwargs: dict, eta) -> bool:
        if task == outbox.PUBLISH_BALANCE and "message" in kwargs:
            message = kwargs["message"]
            realtime.publish(realtime.user_channel(message["transaction"]["user_id"]), message)
            realtime.publish(realtime.ADMIN_CHANNEL, message)
            return True
        celery_app.send_task(task, kwargs=kwargs, eta=eta, retry=False)
        return False

    return send


def drain(celery_app, *, lease_s: int | None = None, **which) -> int:
    """Dispatch every undispatched row now (and, with ``lease_s``, every lost one);
    returns how many were sent. ``which``: claim_and_dispatch's ``only``/``skip``.
    Updates the backlog gauge."""
    from shared import outbox
    from shared.metrics import OUTBOX_BACKLOG

    total = 0
    while True:
        sent = outbox.claim_and_dispatch(send_with(celery_app), lease_s=lease_s, **which)
        total += sent
        if sent == 0:
            if not which:
                OUTBOX_BACKLOG.set(outbox.backlog())
            return total


def _loops():
    """The relay's loops: balance updates alone (the websocket's latency path: a Redis
    PUBLISH each), and everything else (a Celery dispatch each, ~0.5 ms of CPU)."""
    from shared import outbox

    return {"balance": {"only": (outbox.PUBLISH_BALANCE,)},
            "tasks": {"skip": (outbox.PUBLISH_BALANCE,)}}


class Relay:
    """One relay loop, stoppable; a worker runs one per entry of ``_loops()``."""

    def __init__(self, celery_app, which: dict | None = None):
        self.celery_app = celery_app
        self.which = which or {}
        self.stopping = threading.Event()

    def run(self) -> None:
        with self.celery_app.flask_app.app_context():
            while not self.stopping.is_set():
                try:
                    self._serve()
                except Exception as exc:  # keep relaying through outages; sweep covers gaps
                    log.warning("Outbox relay error (%s: %s); retrying in 1 s", type(exc).__name__,
                                str(exc).splitlines()[0][:200] if str(exc) else "")
                    self.stopping.wait(1.0)

    def _serve(self) -> None:
        from shared.db import db

        if db.engine.dialect.name != "postgresql":
            while not self.stopping.is_set():
                drain(self.celery_app, **self.which)
                self.stopping.wait(POLL_S)
            return
        import psycopg

        url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("LISTEN txmon_outbox")
            drain(self.celery_app, **self.which)
            while not self.stopping.is_set():
                woke = any(True for _ in conn.notifies(timeout=1.0, stop_after=1))
                if woke:
                    drain(self.celery_app, **self.which)


class OutboxRelayStep(bootsteps.StartStopStep):
    """Celery worker bootstep running the relay thread (off with TXMON_RELAY=0)."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, **kwargs):
        import os

        self.enabled = os.environ.get("TXMON_RELAY", "1") != "0"
        self.relays = []

    def start(self, worker):
        for name, which in _loops().items():
            relay = Relay(worker.app, which)
            threading.Thread(target=relay.run, name=f"outbox-relay-{name}",
                             daemon=True).start()
            self.relays.append(relay)
        log.info("Outbox relay started (%s)", ", ".join(_loops()))

    def stop(self, worker):
        for relay in self.relays:
            relay.stopping.set()
