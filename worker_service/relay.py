"""The outbox relay: dispatches outbox rows to Celery as soon as they are due.

Runs as threads in each worker's main process. On Postgres it LISTENs on the
``txmon_outbox`` channel (a trigger NOTIFYs at commit): balance updates are published
straight to Redis within milliseconds of the commit (the websocket's latency path), other
rows go out as their handler's task, up to outbox.BATCH_MAX ids per message, on the queue
shared/outbox.py declares. Rows due later (a verification's timeout) wait in the table and
are claimed when due; rows whose message or worker was lost are dispatched again every
LAPSED_EVERY_S. On SQLite the loop polls. Any number of relays may run (SKIP LOCKED).
"""
from __future__ import annotations

import logging
import threading
import time

from celery import bootsteps

from shared import outbox

log = logging.getLogger("txmon.relay")
POLL_S = 0.25  # SQLite: how often the loop claims
DUE_EVERY_S = 1.0  # Postgres: how often the task loop looks for rows come due without a commit
LAPSED_EVERY_S = 5.0
CLAIM_LIMIT = 500  # rows per claim transaction

# How long the task loop lets commits gather after a wake-up before it claims: a stream of
# commits otherwise wakes it per commit with a row or two each, one Celery message each; a
# push or an email starts at most this much after its commit. Balance updates never wait.
TASKS_LINGER_S = 0.2


def dispatcher(celery_app):
    """``dispatch(rows)`` for outbox.claim_and_dispatch: one message per handler and
    BATCH_MAX rows, on the handler's queue."""

    def dispatch(rows) -> None:
        groups: dict[str, list[int]] = {}
        for row in rows:
            groups.setdefault(row.task, []).append(row.id)
        for task, ids in groups.items():
            queue = outbox.HANDLERS[task].queue
            for i in range(0, len(ids), outbox.BATCH_MAX):
                celery_app.send_task(task, kwargs={"outbox_ids": ids[i:i + outbox.BATCH_MAX]},
                                     queue=queue, retry=False)

    return dispatch


def drain(celery_app, *, lapsed: bool = False, **which) -> int:
    """Dispatch every due row now (``lapsed``: every lost one); returns how many were sent.
    ``which``: claim_and_dispatch's ``only``/``skip``. Updates the backlog gauge."""
    from shared.db import db
    from shared.metrics import OUTBOX_BACKLOG

    balances_only = (not lapsed and which == {"only": (outbox.PUBLISH_BALANCE,)}
                     and db.engine.dialect.name == "postgresql")
    total = 0
    while True:
        if balances_only:
            sent = _publish_balances()
        else:
            sent = outbox.claim_and_dispatch(dispatcher(celery_app), limit=CLAIM_LIMIT,
                                             lapsed=lapsed, **which)
        total += sent
        if sent < CLAIM_LIMIT:  # a short claim took all there was
            if not which and not lapsed:
                OUTBOX_BACKLOG.set(outbox.backlog())
            return total


def _publish_balances() -> int:
    """Claim and complete the waiting balance updates in one statement, publish them in one
    Redis pipeline as the JSON text the ledger stored, then commit. If Redis fails, the
    claim rolls back and the rows wait."""
    from flask import current_app

    from shared import realtime
    from shared.db import RawSql, db
    from shared.redis_client import client

    with RawSql.transaction(db.engine) as sql:
        rows = outbox.claim_balances(sql, CLAIM_LIMIT)
        if not rows:
            return 0
        pipe = client(current_app.config["REDIS_URL"]).pipeline(transaction=False)
        for _row_id, user_id, message in rows:
            pipe.publish(realtime.user_channel(user_id), message)
            pipe.publish(realtime.ADMIN_CHANNEL, message)
        pipe.execute()
    return len(rows)


def relays(celery_app) -> dict[str, "Relay"]:
    """A worker's relay loops by name: on Postgres the balance loop listens and wakes the task
    loop; on SQLite one polling loop dispatches everything."""
    from shared.db import db

    with celery_app.flask_app.app_context():
        postgres = db.engine.dialect.name == "postgresql"
    if not postgres:
        return {"tasks": Relay(celery_app, {}, listen=False)}
    tasks = Relay(celery_app, {"skip": (outbox.PUBLISH_BALANCE,)}, linger=TASKS_LINGER_S,
                  listen=False)
    return {"balance": Relay(celery_app, {"only": (outbox.PUBLISH_BALANCE,)},
                             followers=[tasks]), "tasks": tasks}


class Relay:
    """One relay loop, stoppable. On Postgres one loop per worker (``listen``) holds the
    worker's only LISTEN connection and wakes the others (``followers``) at every
    notification; the others also claim every DUE_EVERY_S (rows come due) and send lapsed
    rows again every LAPSED_EVERY_S."""

    def __init__(self, celery_app, which: dict, linger: float = 0.0, *, listen: bool = True,
                 followers=()):
        self.celery_app = celery_app
        self.which = which
        self.linger = linger
        self.listen = listen
        self.followers = list(followers)
        self.stopping = threading.Event()
        self.woken = threading.Event()
        self.lapsed_at = 0.0

    def wake(self) -> None:
        """Another loop's LISTEN saw a commit: drain (after the linger)."""
        self.woken.set()

    def stop(self) -> None:
        self.stopping.set()
        self.woken.set()

    def run(self) -> None:
        with self.celery_app.flask_app.app_context():
            while not self.stopping.is_set():
                try:
                    self._serve()
                except Exception as exc:  # keep relaying through outages
                    log.warning("Outbox relay error (%s: %s); retrying in 1 s", type(exc).__name__,
                                str(exc).splitlines()[0][:200] if str(exc) else "")
                    self.stopping.wait(1.0)

    def _drain(self) -> None:
        drain(self.celery_app, **self.which)
        if not self.listen and time.monotonic() - self.lapsed_at >= LAPSED_EVERY_S:
            self.lapsed_at = time.monotonic()
            drain(self.celery_app, lapsed=True, **self.which)
            _heartbeat()

    def _serve(self) -> None:
        from shared.db import db

        if not self.listen:
            wait = POLL_S if db.engine.dialect.name != "postgresql" else DUE_EVERY_S
            self._drain()
            while not self.stopping.is_set():
                if self.woken.wait(wait) and self.linger and not self.stopping.is_set():
                    self.stopping.wait(self.linger)
                # Cleared before the claim: a commit from here on wakes it again.
                self.woken.clear()
                if not self.stopping.is_set():
                    self._drain()
            return
        import psycopg

        url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(url, autocommit=True, application_name="txmon-relay") as conn:
            conn.execute("LISTEN txmon_outbox")
            # Listening (again): what was committed before is claimed now, by every loop.
            for follower in self.followers:
                follower.wake()
            self._drain()
            while not self.stopping.is_set():
                if any(True for _ in conn.notifies(timeout=1.0, stop_after=1)):
                    # One claim answers every commit notified so far: a burst is one drain,
                    # not one (mostly empty) claim per commit. Later ones wake the next.
                    for _ in conn.notifies(timeout=0):
                        pass
                    for follower in self.followers:
                        follower.wake()
                    self._drain()


def _heartbeat() -> None:
    from flask import current_app

    from shared import health
    from shared.redis_client import client

    try:
        health.beat(client(current_app.config["REDIS_URL"]))
    except Exception:  # Redis away: the worker still relays; the home page shows it missing
        pass


class OutboxRelayStep(bootsteps.StartStopStep):
    """Celery worker bootstep running the relay loops, a thread each (off with
    TXMON_RELAY=0)."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, **kwargs):
        import os

        self.enabled = os.environ.get("TXMON_RELAY", "1") != "0"
        self.relays: dict[str, Relay] = {}

    def start(self, worker):
        self.relays = relays(worker.app)
        for name, relay in self.relays.items():
            threading.Thread(target=relay.run, name=f"outbox-relay-{name}",
                             daemon=True).start()
        log.info("Outbox relay started (%s)", ", ".join(self.relays))

    def stop(self, worker):
        for relay in self.relays.values():
            relay.stop()
