"""Recovery of the delivery pipeline under real faults, with a real Celery worker, a real
SMTP server (aiosmtpd) and a test-owned Redis that keeps nothing on disk.

- Redis restarted without persistence during mixed traffic (its queues really lost):
  every follow-up still due is done within 60 s of its return, each notification's email
  exactly once (by its Message-ID), no alert twice. No beat and no sweep sent by the test:
  the worker's relay finds the lost rows itself.
- All processes of the worker host killed with SIGKILL mid-traffic, a new worker started:
  the same, within 60 s of the new worker being up; an email can repeat only for a row a
  killed process held at the moment of the kill (sent, not yet recorded), and then with
  the same Message-ID.
- An SMTP server that accepts connections and never answers: pushes, balance updates
  and alert checks are all done while every email waits; the emails go out once it
  answers.

"Within 60 s" is the polling deadline of each wait, not a measurement.
"""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter

import pytest

from tests.support import invariant_violations
from tests.support.common import RedisServer
from tests.support.workers import Worker, rows, scalar, wait_until, worker_env

RECOVERY_S = 60


@pytest.fixture
def volatile_redis(tmp_path, database_url):
    if not database_url.startswith("postgres"):
        pytest.skip("worker tests run against PostgreSQL (LISTEN/NOTIFY, SKIP LOCKED)")
    server = RedisServer(tmp_path)  # keeps nothing: a restart loses every queued message
    server.start()
    yield server
    server.kill()


@pytest.fixture
def start_worker(app, database_url, volatile_redis, tmp_path):
    started: list[Worker] = []

    def start(smtp_url: str) -> Worker:
        env = worker_env(app, database_url, volatile_redis.url(), smtp_url, tmp_path)
        w = Worker(env=env, log_path=tmp_path / f"worker-{len(started)}.log", concurrency=2,
                   app_spec="worker_service.celery_app",
                   metrics_port=int(env["TXMON_WORKER_METRICS_PORT"]))
        started.append(w)
        return w.start()

    yield start
    for w in started:
        w.kill()


class Traffic:
    """Credits, purchases (short timeouts, so some expire), cancels and large debits (alert
    checks that fire) from a thread, until stopped."""

    def __init__(self, app, service: dict, users: list[str]):
        self.client, self.service, self.users = app.test_client(), service, users
        self.answers: list[int] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            user = self.users[i % len(self.users)]
            kind = i % 4
            if kind == 0:
                r = self.client.post(f"/api/v1/accounts/{user}/credits", headers=self.service,
                                     json={"amount_cents": 2000, "payment_id": f"tp-{i}"})
            elif kind in (1, 3):
                r = self.client.post("/api/v1/verifications", headers=self.service, json={
                    "id": f"tv-{i}", "user_id": user, "service_name": "Telegram",
                    "country": "DE", "cost_cents": 6000 if kind == 3 else 50,
                    "timeout_seconds": 10})
            else:
                r = self.client.post(f"/api/v1/verifications/tv-{i - 1}/cancel",
                                     headers=self.service, json={"reason": "no sms"})
            self.answers.append(r.status_code)
            i += 1
            self.stopping.wait(0.03)

    def start(self) -> "Traffic":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)


def _accounts(api, n: int, prefix: str) -> list[str]:
    users = [f"{prefix}-{i}" for i in range(n)]
    for u in users:
        api.account(u, 100_000, email=f"{u}@example.com")
    return users


def _open_due(app, tasks: tuple[str, ...] | None = None) -> int:
    sql = ("SELECT count(*) FROM outbox WHERE completed_at IS NULL AND available_at <= now()")
    if tasks:
        sql += " AND task IN (" + ", ".join(f"'{t}'" for t in tasks) + ")"
    return scalar(app, sql)


def _all_done(app) -> bool:
    """Every follow-up due is done: no open due row (dead rows count as not done), every
    email final, every expired verification ended."""
    return (_open_due(app) == 0
            and scalar(app, "SELECT count(*) FROM notification_deliveries WHERE channel = 'email'"
                          " AND status = 'pending'") == 0
            and scalar(app, "SELECT count(*) FROM verifications WHERE status = 'pending'"
                            " AND expires_at <= now()") == 0)


def _wait_done(app, since: float, worker: Worker) -> None:
    wait_until(lambda: _all_done(app), timeout=max(1.0, RECOVERY_S - (time.monotonic() - since)),
               interval=0.5,
               message=lambda: f"every follow-up done within {RECOVERY_S} s: open due rows "
                               f"{rows(app, 'SELECT task, count(*) AS n FROM outbox WHERE completed_at IS NULL AND available_at <= now() GROUP BY task')}; "
                               f"worker log tail:\n{worker.log()[-2500:]}")


def _emails_by_message_id(app, smtp) -> tuple[Counter, set]:
    got = Counter(m.message["Message-ID"] for m in smtp.messages()
                  if str(m.message["Message-ID"]).startswith("<notification-"))
    want = {f"<notification-{r['notification_id']}@txmon.local>" for r in rows(
        app, "SELECT notification_id FROM notification_deliveries"
        " WHERE channel = 'email' AND status = 'sent'")}
    return got, want


def _no_alert_twice(app) -> None:
    assert rows(app, "SELECT rule, transaction_id, count(*) AS n FROM alerts"
                     " GROUP BY rule, transaction_id HAVING count(*) > 1") == []
    assert scalar(app, "SELECT count(*) FROM alerts WHERE rule = 'large_deduction'") > 0


def test_redis_restarted_without_persistence__every_follow_up_within_60s__emails_once(
        app, api, volatile_redis, start_worker, smtp):
    users = _accounts(api, 6, "rr")
    worker = start_worker(smtp.url)
    traffic = Traffic(app, api.service, users).start()
    try:
        wait_until(lambda: len(traffic.answers) >= 60, timeout=60, message="traffic flowing")
        smtp.hold_next = 2  # both children inside SMTP DATA: the queues fill behind them
        wait_until(lambda: smtp.held == 2, timeout=30, message="both children in SMTP DATA")
        wait_until(lambda: sum(volatile_redis.client().llen(q) for q in
                               ("push", "email", "alerts", "refunds")) > 0,
                   timeout=30, message="messages queued in Redis")
        volatile_redis.kill()
        time.sleep(2)  # commits go on while the broker is away
        volatile_redis.start()
        back = time.monotonic()
        assert volatile_redis.client().dbsize() == 0  # every queued message is gone
        smtp.release()
        wait_until(lambda: len(traffic.answers) >= 200, timeout=60, message="more traffic")
    finally:
        traffic.stop()
        smtp.release()
    assert set(traffic.answers) <= {200, 201, 402, 409}, Counter(traffic.answers)
    _wait_done(app, back, worker)

    got, want = _emails_by_message_id(app, smtp)
    assert set(got) == want and want
    assert [mid for mid, n in got.items() if n > 1] == []  # each email exactly once
    _no_alert_twice(app)
    assert scalar(app, "SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL") == 0
    assert invariant_violations(app, delivered=True) == []


def test_worker_host_sigkilled_mid_traffic__new_worker_does_every_follow_up_within_60s(
        app, api, volatile_redis, start_worker, smtp):
    users = _accounts(api, 6, "wk")
    first = start_worker(smtp.url)
    traffic = Traffic(app, api.service, users).start()
    try:
        wait_until(lambda: len(traffic.answers) >= 60 and scalar(
            app, "SELECT count(*) FROM outbox WHERE leased_until > now()") > 0,
                   timeout=60, message="traffic flowing and rows being worked on")
        held = {r["payload"]["notification_id"] for r in rows(
            app, "SELECT payload FROM outbox WHERE task = 'txmon.email.send_notification'"
                 " AND leased_until > now() AND completed_at IS NULL")}
        first.kill()  # the main process and every child, SIGKILL
        held |= {r["payload"]["notification_id"] for r in rows(
            app, "SELECT payload FROM outbox WHERE task = 'txmon.email.send_notification'"
                 " AND leased_until > now() AND completed_at IS NULL")}
        wait_until(lambda: len(traffic.answers) >= 150, timeout=60, message="more traffic")
    finally:
        traffic.stop()
    second = start_worker(smtp.url)
    up = time.monotonic()
    _wait_done(app, up, second)

    got, want = _emails_by_message_id(app, smtp)
    assert set(got) == want and want
    repeated = {mid for mid, n in got.items() if n > 1}
    assert repeated <= {f"<notification-{n}@txmon.local>" for n in held}, (repeated, held)
    _no_alert_twice(app)
    assert invariant_violations(app, delivered=True) == []


class StuckSmtp:
    """Accepts connections and never answers, until ``answer()``: from then on each new
    connection is relayed to a real SMTP server."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.answering = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self.answering.is_set():
                self.held.append(conn)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def answer(self) -> None:
        self.answering.set()
        for conn in self.held:  # the stuck sessions end; their emails are retried
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_stuck_smtp__pushes_balances_and_alert_checks_done__emails_once_it_answers(
        app, api, volatile_redis, start_worker, smtp):
    from shared import outbox

    stuck = StuckSmtp(smtp.port)
    try:
        users = _accounts(api, 4, "st")
        worker = start_worker(stuck.url)
        traffic = Traffic(app, api.service, users).start()
        try:
            wait_until(lambda: len(traffic.answers) >= 60, timeout=60, message="traffic")
        finally:
            traffic.stop()
        others = (outbox.PUSH, outbox.PUBLISH_BALANCE, outbox.CHECK_ALERTS, outbox.PUBLISH_ALERT)
        wait_until(lambda: _open_due(app, others) == 0, timeout=60, interval=0.5,
                   message=lambda: f"pushes, balances and alert checks done while SMTP is "
                                   f"stuck ({_open_due(app, others)} open); log tail:\n"
                                   f"{worker.log()[-2000:]}")
        assert smtp.messages() == []
        assert scalar(app, "SELECT count(*) FROM notification_deliveries WHERE channel = 'email'"
                          " AND status = 'pending'") > 0

        stuck.answer()
        wait_until(lambda: scalar(app, "SELECT count(*) FROM notification_deliveries"
                                       " WHERE channel = 'email' AND status = 'pending'") == 0,
                   timeout=180, interval=1,
                   message=lambda: f"emails sent once SMTP answers; log tail:\n"
                                   f"{worker.log()[-2000:]}")
        got, want = _emails_by_message_id(app, smtp)
        assert set(got) == want and [m for m, n in got.items() if n > 1] == []
        assert invariant_violations(app, delivered=True) == []
    finally:
        stuck.close()
