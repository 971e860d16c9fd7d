"""Fixtures and helpers for the worker tests: a real Redis, a real SMTP server, real workers.

tests/conftest.py loads these fixtures for every module.

- ``redis_server`` (session): a dedicated ``redis-server`` on a free loopback port that keeps
  nothing on disk: stopping it loses every queued message, as a real broker outage does.
- ``smtp`` (per test): an aiosmtpd server on a free loopback port that records every message
  (``SmtpSink``); it can be stopped and started, hold a DATA command open (to kill a worker
  mid-send) or refuse recipients.
- ``workers`` (per test): a factory starting ``celery -A worker_service.celery_app worker -P
  prefork`` subprocesses against the test database, the Redis above (flushed first) and the
  SMTP server; every worker and its children are SIGKILLed in teardown (process group).
- ``celery_client`` (session): a Celery app configured like the workers (same queues and
  routes), used by the tests to ``send_task`` onto that Redis.

Everything waits with ``wait_until`` (bounded polling); no assertion depends on how fast
something happened.

The module also serves ``celery -A tests.support.workers:celery_for_tests``: the project's
Celery app with the overrides the application itself does not read from the environment
(``TXMON_TEST_VISIBILITY_TIMEOUT_S``: see test_worker_outbox.py).
"""
from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.common import (BIN, ROOT, Process, RedisServer, app_env, child_pids,
                                  die_with_parent, free_port, wait_until)

CELERY_BIN = BIN / "celery"
FLASK_BIN = BIN / "flask"
WALLET_BASE = "https://wallet.txmon.test"
ADMIN_EMAIL = "ops@txmon.test"


# -- database helpers ----------------------------------------------------------------------

def rows(app, sql: str, **params) -> list[dict]:
    """Run ``sql`` on the test database; rows as dicts."""
    from sqlalchemy import text

    from shared.db import db

    with app.app_context(), db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def scalar(app, sql: str, **params):
    from sqlalchemy import text

    from shared.db import db

    with app.app_context(), db.engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def execute(app, sql: str, **params) -> None:
    from sqlalchemy import text

    from shared.db import db

    with app.app_context(), db.engine.begin() as conn:
        conn.execute(text(sql), params)


class RowLock:
    """Hold ``SELECT ... FOR UPDATE`` on rows from the test process until ``release()``."""

    def __init__(self, app, sql: str, **params):
        from sqlalchemy import text

        from shared.db import db

        with app.app_context():
            self.conn = db.engine.connect()
        self.tx = self.conn.begin()
        self.locked = self.conn.execute(text(sql), params).fetchall()

    def release(self) -> None:
        if self.conn is not None:
            self.tx.rollback()
            self.conn.close()
            self.conn = None


def outbox_pending(app) -> int:
    """Rows due and not dispatched (a verification's timeout waits undispatched until due)."""
    return scalar(app, "SELECT count(*) FROM outbox WHERE dispatched_at IS NULL"
                       " AND available_at <= CURRENT_TIMESTAMP")


def email_statuses(app, user_id: str | None = None) -> dict[int, str]:
    sql = ("SELECT n.id, d.status AS email_status FROM notifications n"
           " JOIN notification_deliveries d ON d.notification_id = n.id AND d.channel = 'email'")
    if user_id:
        sql += " WHERE n.user_id = :u"
    return {r["id"]: r["email_status"] for r in rows(app, sql, u=user_id)}


# -- processes and sockets under /proc -----------------------------------------------------

def _socket_inodes_with_local_port(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    return inodes


def pid_owning_local_port(port: int, candidates: list[int]) -> int | None:
    """Which of ``candidates`` has a TCP socket bound locally to ``port`` (a client socket)."""
    inodes = _socket_inodes_with_local_port(port)
    for pid in candidates:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    return None


# -- Redis ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


# -- SMTP ----------------------------------------------------------------------------------

@dataclass
class Received:
    peer: tuple
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    message: email.message.EmailMessage = field(init=False)

    def __post_init__(self):
        self.message = email.message_from_bytes(self.data, policy=email.policy.default)

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def to(self) -> str:
        return str(self.message["To"])

    def part(self, subtype: str) -> str | None:
        body = self.message.get_body(preferencelist=(subtype,))
        if body is None or body.get_content_subtype() != subtype:
            return None
        return body.get_content()


class SmtpSink:
    """aiosmtpd handler + controller that records messages; can hold or refuse them."""

    def __init__(self):
        self.port = free_port()
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.refuse: set[str] = set()  # recipients answered 550 at RCPT
        self.hold_next = 0  # how many coming DATA commands to hold open until release()
        self.holding = threading.Event()
        self.held = 0  # DATA commands held so far
        self.held_peer: tuple | None = None
        self._release = threading.Event()
        self.controller = None

    # aiosmtpd handler hooks
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode()
        with self.lock:
            self.received.append(Received(tuple(session.peer), envelope.mail_from,
                                          list(envelope.rcpt_tos), data))
            hold = self.hold_next > 0
            if hold:
                self.hold_next -= 1
                self.held += 1
            release = self._release  # a later hold() does not catch this one again
        if hold:
            self.held_peer = tuple(session.peer)
            self.holding.set()
            deadline = time.monotonic() + 120
            while not release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        return "250 Message accepted for delivery"

    # control
    def start(self) -> None:
        from aiosmtpd.controller import Controller

        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self._release.set()
            self.controller.stop()
            self.controller = None

    def release(self) -> None:
        self._release.set()

    def hold(self, count: int) -> None:
        """Hold the next ``count`` DATA commands open until ``release()``, again after an
        earlier release; ``holding`` and ``held`` count from here."""
        with self.lock:
            self._release = threading.Event()
            self.holding.clear()
            self.held = 0
            self.hold_next = count

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def messages(self, *, to: str | None = None, subject: str | None = None) -> list[Received]:
        with self.lock:
            found = list(self.received)
        if to is not None:
            found = [m for m in found if to in m.rcpt_tos]
        if subject is not None:
            found = [m for m in found if m.subject == subject]
        return found


@pytest.fixture
def smtp():
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


# -- Celery --------------------------------------------------------------------------------

def celery_publisher(redis_url: str):
    """A Celery app configured as the workers' (``celery_config``: queues, routes, the
    broker transport of worker_service/broker.py) publishing to ``redis_url``; close it
    after use."""
    from celery import Celery

    from worker_service.celery_app import celery_config

    client = Celery("txmon-tests", set_as_current=False)
    client.conf.update(celery_config({"REDIS_URL": redis_url}))
    return client


@pytest.fixture(scope="session")
def celery_client(redis_server):
    """A Celery app with the workers' queues and routes, publishing to ``redis_server``."""
    client = celery_publisher(redis_server.url())
    yield client
    client.close()


class Worker:
    """One ``celery worker`` subprocess (its own session, so teardown kills the whole group)."""

    def __init__(self, *, env: dict, log_path: Path, concurrency: int, app_spec: str,
                 metrics_port: int):
        self.env, self.log_path, self.concurrency = env, log_path, concurrency
        self.app_spec, self.metrics_port = app_spec, metrics_port
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "Worker":
        cmd = [str(CELERY_BIN), "-A", self.app_spec, "worker", "-P", "prefork",
               "-c", str(self.concurrency), "--loglevel=INFO", "--without-mingle",
               "--without-gossip", "-n", f"txmon-test-{uuid.uuid4().hex[:8]}@%h"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent)
        wait_until(lambda: self.proc.poll() is not None or (
            " ready." in self.log() and "Outbox relay started" in self.log()
            and len(self.children()) >= self.concurrency),
            timeout=60, message="celery worker ready")
        assert self.proc.poll() is None, f"worker exited:\n{self.log()[-3000:]}"
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.log().splitlines() if rx.search(line)]

    def received(self, task_name: str) -> dict[str, int]:
        """How many times each task id of ``task_name`` was received (delivered)."""
        counts: dict[str, int] = {}
        for line in self.lines(rf"Task {re.escape(task_name)}\[[0-9a-f-]+\] received"):
            task_id = re.search(r"\[([0-9a-f-]+)\] received", line).group(1)
            counts[task_id] = counts.get(task_id, 0) + 1
        return counts

    def children(self) -> list[int]:
        return child_pids(self.pid) if self.proc and self.proc.poll() is None else []

    def metrics(self) -> dict[tuple, float]:
        """The worker's :metrics as {(name, sorted label items): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    def kill(self) -> None:
        """The whole worker host dies: SIGKILL to the main process and every pool child."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def worker_env(app, database_url: str, redis_url: str, smtp_url: str | None, tmp: Path,
               **overrides) -> dict:
    """The environment of a worker subprocess: the test database, Redis, SMTP and secrets."""
    env = app_env(app, database_url, redis_url, tmp,
                  TXMON_WORKER_METRICS_PORT=free_port(), TXMON_PUBLIC_URL=WALLET_BASE,
                  TXMON_ADMIN_EMAIL=ADMIN_EMAIL, TXMON_RATELIMIT_STORAGE=redis_url)
    if smtp_url:
        env["SMTP_URL"] = smtp_url
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture
def workers(app, database_url, redis_server, tmp_path):
    """Factory: ``workers.start(smtp=sink, concurrency=2, **env_overrides) -> Worker``.

    Flushes the test Redis first (no message of an earlier test survives); kills every
    worker it started, with its children, at teardown.
    """
    if not database_url.startswith("postgres"):
        pytest.skip("worker tests run against PostgreSQL (LISTEN/NOTIFY, SKIP LOCKED)")
    if not redis_server.ping():  # an earlier test left it stopped
        redis_server.start()
    redis_server.client().flushall()
    started: list[Worker] = []

    class Factory:
        def env(self, smtp: SmtpSink | None = None, **overrides) -> dict:
            return worker_env(app, database_url, redis_server.url(),
                              smtp.url if smtp else None, tmp_path, **overrides)

        def start(self, smtp: SmtpSink | None = None, *, concurrency: int = 2,
                  app_spec: str = "worker_service.celery_app", **overrides) -> Worker:
            env = self.env(smtp, **overrides)
            w = Worker(env=env, log_path=tmp_path / f"worker-{len(started)}.log",
                       concurrency=concurrency, app_spec=app_spec,
                       metrics_port=int(env["TXMON_WORKER_METRICS_PORT"]))
            started.append(w)
            return w.start()

    yield Factory()
    for w in started:  # logs stay in tmp_path (pytest keeps the last runs) for post-mortems
        w.kill()
    if redis_server.ping():
        redis_server.client().flushall()


@pytest.fixture
def beat(app, database_url, redis_server, tmp_path):
    """Factory: ``beat.start() -> Process``: ``celery beat`` as scripts/run runs it (the
    project's schedule: outbox sweep, expiry scan, reconciliation), on the test Redis."""
    started: list[Process] = []

    class Factory:
        def start(self, **overrides) -> Process:
            env = worker_env(app, database_url, redis_server.url(), None, tmp_path, **overrides)
            n = len(started)
            proc = Process(f"beat-{n}", [
                str(CELERY_BIN), "-A", "worker_service.celery_app", "beat", "--loglevel=INFO",
                "--schedule", str(tmp_path / f"celerybeat-schedule-{n}")], env, tmp_path)
            started.append(proc)

            def up():
                assert proc.alive(), f"celery beat exited:\n{proc.tail()}"
                return "beat: Starting..." in proc.output()

            wait_until(up, 60, message=lambda: f"celery beat started:\n{proc.tail()}")
            return proc

    yield Factory()
    for proc in started:
        proc.stop(grace=5)


def wait_idle(app, redis_server, *, timeout: float = 60.0, dead: set[str] = frozenset()) -> None:
    """Wait until the system is provably idle: no due outbox row undispatched, nothing in a
    Celery queue, and no task taken by a worker and not yet acknowledged (acks_late: a task
    running or reserved stays in kombu's ``unacked`` hash) other than countdown tasks still
    waiting for their ETA, and ``dead``: task ids a killed worker host held (they stay in
    the hash until the visibility timeout). Counting after this proves "no duplicate"
    without a quiet window."""
    import json

    from worker_service.celery_app import celery_config

    queues = {q.name for q in celery_config({"REDIS_URL": redis_server.url()})["task_queues"]}

    def idle():
        if scalar(app, "SELECT count(*) FROM outbox WHERE dispatched_at IS NULL "
                       "AND available_at <= now()"):
            return False
        with redis_server.client() as r:
            if any(r.llen(q) for q in queues):
                return False
            held = [json.loads(raw)[0].get("headers", {}) for raw in r.hvals("unacked")]
        return not [h for h in held if not h.get("eta") and h.get("id") not in dead]

    wait_until(idle, timeout, message="outbox dispatched, queues empty, nothing unacknowledged")


def wait_quiet(app, worker: Worker, *, timeout: float = 60.0) -> None:
    """Wait until the outbox is dispatched and no notification email is still pending."""
    wait_until(lambda: outbox_pending(app) == 0, timeout=timeout,
               message=lambda: f"outbox dispatched ({outbox_pending(app)} left); worker log "
                               f"tail:\n{worker.log()[-2000:]}")
    wait_until(lambda: "pending" not in email_statuses(app).values(), timeout=timeout,
               message=lambda: f"no email pending ({email_statuses(app)}); worker log tail:\n"
                               f"{worker.log()[-2000:]}")


# -- `celery -A tests.support.workers:celery_for_tests` -----------------------------------

def _celery_for_tests():
    """The project's Celery app plus overrides the app does not take from the environment.

    ``TXMON_TEST_VISIBILITY_TIMEOUT_S``: goes through the app's own knob
    (``app.config["CELERY_VISIBILITY_TIMEOUT_S"]`` read by ``celery_config``), which
    shared/config.py does not fill from the environment; kombu's unacked-restore sweep is
    made to run every second so a short visibility timeout takes effect promptly.
    """
    from worker_service.celery_app import celery, celery_config, flask_app

    visibility = os.environ.get("TXMON_TEST_VISIBILITY_TIMEOUT_S")
    if visibility:
        flask_app.config["CELERY_VISIBILITY_TIMEOUT_S"] = int(visibility)
        celery.conf.update(celery_config(flask_app.config))
        options = dict(celery.conf.broker_transport_options)
        options.update(unacked_restore_interval=1, unacked_restore_throttle=1)
        celery.conf.broker_transport_options = options
    return celery


def __getattr__(name: str):
    if name == "celery_for_tests":
        return _celery_for_tests()
    raise AttributeError(name)
