"""The outbox relay: dispatches outbox rows to Celery as soon as their commit lands.

Runs as a thread in each worker's main process. On Postgres it LISTENs on the
``txmon_outbox`` channel (a trigger NOTIFYs at commit), so balance updates go out within
milliseconds of the commit and other rows within TASKS_LINGER_S; on SQLite it polls. Any
number of relays may run: rows are claimed with SKIP LOCKED. The beat task
``txmon.outbox.sweep`` is the safety net.
"""
from __future__ import annotations

import json
import logging
import threading

from celery import bootsteps

log = logging.getLogger("txmon.relay")
POLL_S = 0.25


# Rows per txmon.outbox.run_batch task. Celery's own cost per task (receive, ack, events:
# ~1.5 ms in the worker's main process, measured) is paid once per batch; a batch holds a
# pool child for its whole run, so it stays small enough to keep both children busy and
# latency low (a batch of 20 deliveries runs in ~50 ms).
BATCH_MAX = 20

# Countdown rows (ETA) claimed together whose ETAs fall in the same slot of this many
# seconds go out as one countdown task: each ETA task costs the relay a broker round trip
# and the worker's consumer a message held until it is due (with one per purchase, they
# were most of the relay's work at 200 purchases/s: measured with py-spy). A row runs at
# most this much after its own ETA.
ETA_BUCKET_S = 1.0


def queue_of(task: str) -> str:
    """The queue a task name routes to (txmon.<family>.<action> -> <family>)."""
    from worker_service.celery_app import FAMILIES

    parts = task.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "txmon" and parts[1] in FAMILIES \
        else "default"


class Sender:
    """The ``send`` callback for shared.outbox.claim_and_dispatch, over ``celery_app``.

    Balance updates that carry their message are published straight to Redis pub/sub
    (no task hop: this is the websocket's latency path), pipelined per claim. Rows due now
    are grouped per queue into ``txmon.outbox.run_batch`` tasks of up to BATCH_MAX rows (a
    group of one is sent as its own task). Rows with an ETA (the purchase's countdown
    refund) are grouped the same way per queue and per ETA_BUCKET_S slot of their ETA; the
    group is sent as one countdown task with the latest ETA of its rows, so no row runs
    before its time and none more than ETA_BUCKET_S after it. ``flush()`` sends what is
    left; claim_and_dispatch calls it inside the claim.
    """

    def __init__(self, celery_app, batch_max: int | None = None):
        self.celery_app = celery_app
        self.batch_max = BATCH_MAX if batch_max is None else batch_max
        self.groups: dict[str, list] = {}
        self.timed: dict[tuple, list] = {}  # (queue, ETA slot) -> [latest eta, rows]
        self.pipeline = None

    def __call__(self, task: str, kwargs: dict, eta) -> bool:
        from shared import outbox, realtime

        if task == outbox.PUBLISH_BALANCE and "message" in kwargs:
            message = kwargs["message"]
            if self.pipeline is None:
                from flask import current_app

                from shared.redis_client import client

                self.pipeline = client(current_app.config["REDIS_URL"]).pipeline(
                    transaction=False)
            data = json.dumps(message)
            self.pipeline.publish(realtime.user_channel(message["transaction"]["user_id"]), data)
            self.pipeline.publish(realtime.ADMIN_CHANNEL, data)
            return True
        if self.batch_max <= 1:
            self.celery_app.send_task(task, kwargs=kwargs, eta=eta, retry=False)
            return False
        queue = queue_of(task)
        if eta is not None:
            key = (queue, int(eta.timestamp() // ETA_BUCKET_S))
            timed = self.timed.setdefault(key, [eta, []])
            timed[0] = max(timed[0], eta)
            timed[1].append([task, kwargs])
            if len(timed[1]) >= self.batch_max:
                self._send(queue, self.timed.pop(key)[1], eta=timed[0])
            return False
        group = self.groups.setdefault(queue, [])
        group.append([task, kwargs])
        if len(group) >= self.batch_max:
            self._send(queue, group)
            self.groups[queue] = []
        return False

    def _send(self, queue: str, group: list, eta=None) -> None:
        if len(group) == 1:
            task, kwargs = group[0]
            self.celery_app.send_task(task, kwargs=kwargs, eta=eta, retry=False)
        elif group:
            self.celery_app.send_task(BATCH_TASK, kwargs={"items": group}, queue=queue,
                                      eta=eta, retry=False)

    def flush(self) -> None:
        groups, self.groups = self.groups, {}
        for queue, group in groups.items():
            self._send(queue, group)
        timed, self.timed = self.timed, {}
        for (queue, _slot), (eta, group) in timed.items():
            self._send(queue, group, eta=eta)
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.execute()


BATCH_TASK = "txmon.outbox.run_batch"
CLAIM_LIMIT = 500  # rows per claim transaction


def send_with(celery_app, batch_max: int | None = None) -> Sender:
    """The ``send`` callback for shared.outbox.claim_and_dispatch (see ``Sender``)."""
    return Sender(celery_app, batch_max)


def drain(celery_app, *, lease_s: int | None = None, **which) -> int:
    """Dispatch every undispatched row now (and, with ``lease_s``, every lost one);
    returns how many were sent. ``which``: claim_and_dispatch's ``only``/``skip``.
    Updates the backlog gauge."""
    from shared import outbox
    from shared.metrics import OUTBOX_BACKLOG

    from shared.db import db

    balances_only = (lease_s is None and which == {"only": (outbox.PUBLISH_BALANCE,)}
                     and db.engine.dialect.name == "postgresql")
    total = 0
    while True:
        if balances_only:
            sent = _publish_balances(celery_app)
        else:
            sent = outbox.claim_and_dispatch(send_with(celery_app), limit=CLAIM_LIMIT,
                                             lease_s=lease_s, **which)
        total += sent
        # A short claim took all there was (rows committed since woke the relay again):
        # no second, empty claim per wake-up.
        if sent < CLAIM_LIMIT:
            if not which:
                OUTBOX_BACKLOG.set(outbox.backlog())
            return total


_CLAIM_BALANCES = (
    "UPDATE outbox SET dispatched_at = %s, completed_at = %s, attempts = attempts + 1"
    " WHERE id IN (SELECT id FROM outbox WHERE dispatched_at IS NULL AND task = %s"
    " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
    " RETURNING id, user_id, (payload -> 'message')::text,"
    " CASE WHEN payload -> 'message' IS NULL THEN payload::text END")
_REOPEN = "UPDATE outbox SET completed_at = NULL WHERE id = ANY(%s)"


def _publish_balances(celery_app) -> int:
    """The balance loop's claim on Postgres, which runs once per commit of the whole
    platform: one statement claims and completes the waiting balance updates, they are
    published in one Redis pipeline, then the commit. The same contract as
    claim_and_dispatch with ``only=(PUBLISH_BALANCE,)`` (if Redis fails, the claim rolls
    back and the rows wait), at a fraction of its CPU: fixed SQL sent with its BEGIN as one
    message (shared.db.RawSql.transaction), and each message published as the JSON text
    the ledger stored (no decoding and encoding again). A row without its message
    (written by older code) goes out as its task and stays open until that task
    completes it."""
    from flask import current_app

    from shared import outbox, realtime
    from shared.db import RawSql, db, utcnow
    from shared.redis_client import client

    now = utcnow()
    with RawSql.transaction(db.engine) as sql:
        rows = sql.execute(_CLAIM_BALANCES, (now, now, outbox.PUBLISH_BALANCE,
                                             CLAIM_LIMIT)).fetchall()
        if not rows:
            return 0
        pipe = client(current_app.config["REDIS_URL"]).pipeline(transaction=False)
        as_tasks = []
        for row_id, user_id, message, payload in rows:
            if message is None:
                celery_app.send_task(outbox.PUBLISH_BALANCE, retry=False,
                                     kwargs=dict(json.loads(payload), outbox_id=row_id))
                as_tasks.append(row_id)
                continue
            pipe.publish(realtime.user_channel(user_id), message)
            pipe.publish(realtime.ADMIN_CHANNEL, message)
        pipe.execute()
        if as_tasks:
            sql.execute(_REOPEN, (as_tasks,))
    return len(rows)


# How long the task loop lets commits gather after a wake-up before it claims. A stream of
# commits (refund batches, API traffic) otherwise wakes it per commit and every claim holds a
# row or two: one Celery task each. Gathering for this long turns them into batches (see
# Sender), for at most this much more latency; balance updates never wait. 0.2 s, not the
# earlier 0.05 s: at 50 purchases/s a claim then holds ~10 purchases' rows instead of ~2,
# and the worker spent about half the CPU (scripts/bench_ws, Celery's share 28.8% -> 15.7%
# of the machine); a push or an email starts at most 0.2 s after its commit.
TASKS_LINGER_S = 0.2


def _loops():
    """The relay's loops: balance updates alone (the websocket's latency path: a Redis
    PUBLISH each), and everything else (Celery dispatches, batched)."""
    from shared import outbox

    return {"balance": {"only": (outbox.PUBLISH_BALANCE,)},
            "tasks": {"skip": (outbox.PUBLISH_BALANCE,)}}


def _linger(name: str) -> float:
    return TASKS_LINGER_S if name == "tasks" else 0.0


def relays(celery_app) -> dict[str, "Relay"]:
    """A worker's relay loops by name: the balance loop listens, the others follow it."""
    followers = {name: Relay(celery_app, which, linger=_linger(name), listen=False)
                 for name, which in _loops().items() if name != "balance"}
    return {"balance": Relay(celery_app, _loops()["balance"], linger=_linger("balance"),
                             followers=followers.values()), **followers}


class Relay:
    """One relay loop, stoppable; a worker runs one per entry of ``_loops()``.

    On Postgres one loop per worker (``listen``, the balance loop: the latency path drains
    in the thread the notification wakes) holds the worker's only LISTEN connection and
    wakes the others (``followers``) at every notification: one listening backend per
    worker host, so a commit wakes one Postgres backend per worker, not one per loop.
    """

    def __init__(self, celery_app, which: dict | None = None, linger: float = 0.0, *,
                 listen: bool = True, followers=()):
        self.celery_app = celery_app
        self.which = which or {}
        self.linger = linger
        self.listen = listen
        self.followers = list(followers)
        self.stopping = threading.Event()
        self.woken = threading.Event()

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
                except Exception as exc:  # keep relaying through outages; sweep covers gaps
                    log.warning("Outbox relay error (%s: %s); retrying in 1 s", type(exc).__name__,
                                str(exc).splitlines()[0][:200] if str(exc) else "")
                    self.stopping.wait(1.0)

    def _drain(self) -> None:
        drain(self.celery_app, **self.which)

    def _serve(self) -> None:
        from shared.db import db

        if db.engine.dialect.name != "postgresql":
            while not self.stopping.is_set():
                self._drain()
                self.stopping.wait(POLL_S)
            return
        if not self.listen:
            self._drain()
            while not self.stopping.is_set():
                if self.woken.wait(1.0) and not self.stopping.is_set():
                    if self.linger:
                        self.stopping.wait(self.linger)
                    # Cleared before the claim: a commit from here on wakes it again.
                    self.woken.clear()
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
                    for follower in self.followers:
                        follower.wake()
                    if self.linger:
                        self.stopping.wait(self.linger)
                    self._drain()


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
