"""Faults with real processes: a worker host SIGKILLed and Redis stopped during traffic,
worker children SIGKILLed mid-task.

DESIGN.md invariant 6 / issue 3: with Redis stopped the API keeps accepting purchases,
credits and refunds, and once Redis is back everything pending is delivered; a worker host
or child killed mid-task does not lose the task (acks_late + reject_on_worker_lost, the
outbox's own 30 s leases, shared/outbox.py): the task's effect still happens exactly
once (an email at least once, repeated with its own Message-ID).

Each scenario runs its faults one after the other on one stack without waiting in between:
the leases of what each fault interrupted lapse together, not one after the other.
"""
from __future__ import annotations

import os
import re
import signal
import threading
from collections import Counter
from datetime import datetime, timezone

from tests.support import invariant_violations, ok
from tests.support.workers import (RowLock, email_statuses, outbox_pending,
                                  pid_owning_local_port, rows, scalar, wait_idle, wait_until)


class Traffic:
    """Credits, purchases and cancels from a background thread, recording every answer."""

    def __init__(self, app, service_headers: dict, users: list[str]):
        self.app, self.headers, self.users = app, service_headers, users
        self.answers: list[tuple[str, str, int, dict]] = []  # (phase, op, status, body)
        self.phase = "before"
        self.pace = 0.05  # seconds between requests: steady traffic, not a flood
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        client = self.app.test_client()
        i = 0
        try:
            while not self.stopping.is_set():
                user = self.users[i % len(self.users)]
                phase, kind = self.phase, ("credit", "purchase", "cancel")[i % 3]
                if kind == "credit":
                    r = client.post(f"/api/v1/accounts/{user}/credits", headers=self.headers,
                                    json={"amount_cents": 100 + i, "payment_id": f"pay-{i}"})
                elif kind == "purchase":
                    r = client.post("/api/v1/verifications", headers=self.headers, json={
                        "id": f"vr-{i}", "user_id": user, "service_name": "Telegram",
                        "country": "DE", "cost_cents": 40 + i % 7})
                else:
                    r = client.post(f"/api/v1/verifications/vr-{i - 1}/cancel",
                                    headers=self.headers, json={"reason": "no sms"})
                self.answers.append((phase, kind, r.status_code, r.get_json()))
                i += 1
                self.stopping.wait(self.pace)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def count(self, phase: str | None = None) -> int:
        return sum(1 for a in list(self.answers) if phase is None or a[0] == phase)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error


def _unfinished(worker, task: str = "") -> int:
    """Tasks the worker took from Redis and has not finished (running or reserved)."""
    rx = re.compile(r"Task (txmon\.[\w.]+)\[([0-9a-f-]+)\] (received|succeeded|retry|raised|failed)")
    received, finished = set(), set()
    for line in worker.log().splitlines():
        m = rx.search(line)
        if m and m.group(1).startswith(task or "txmon."):
            (received if m.group(3) == "received" else finished).add(m.group(2))
    return len(received - finished)


def _tx_id(kind: str, body: dict) -> int:
    return body["refund"]["id"] if kind == "cancel" else body["transaction"]["id"]


def _running(pids: list[int]) -> list[int]:
    """Those of ``pids`` still alive (a zombie has died, it is just not reaped yet)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


def test_worker_host_sigkilled_then_redis_stopped_during_traffic__api_keeps_working__nothing_lost(
        app, api, workers, beat, smtp, redis_server):
    """First the whole worker host dies (main process and pool children, SIGKILL) while its
    email task is inside SMTP DATA; a new worker host comes up, beat runs as in scripts/run.

    Then, on the new host, traffic runs before, during and after a Redis outage. When Redis
    stops, the worker is busy (both children inside a slow SMTP DATA) and holds more email
    tasks it has taken but not started - the normal state of a loaded worker. Redis keeps
    nothing on disk, so those messages and everything queued are lost; Celery beat sends the
    outbox sweep, which sends them again once their lease has passed. The dead host's email
    waits for its lease meanwhile; the new host delivers it too."""
    # -- the worker host dies mid-email ---------------------------------------------------
    smtp.hold(1)
    first = workers.start(smtp=smtp)
    beat.start()
    api.account("hal", 0, email="hal@example.com")
    ok(api.client.post("/api/v1/accounts/hal/credits", headers=api.service,
                       json={"amount_cents": 4321, "payment_id": "ph-1"}))
    wait_until(smtp.holding.is_set, timeout=30, message="hal's email task inside SMTP DATA")
    pids = [first.pid, *first.children()]
    first.kill()
    wait_until(lambda: not _running(pids), timeout=30,
               message=lambda: f"dead host: {_running(pids)}")
    held_by_the_dead = redis_server.unacked_ids()  # no other worker runs yet
    smtp.release()
    worker = workers.start(smtp=smtp)

    # -- Redis stops during traffic, the new host busy ------------------------------------
    users = [f"rd-{i}" for i in range(4)]
    for u in users:
        api.account(u, 50_000, email=f"{u}@example.com")
    traffic = Traffic(app, api.service, users)
    traffic.start()
    try:
        wait_until(lambda: traffic.count("before") >= 15, timeout=60, message="traffic flowing")
        wait_until(lambda: "sent" in email_statuses(app).values(), timeout=30,
                   message="the worker delivering before the outage")
        smtp.hold(2)
        wait_until(lambda: smtp.held == 2, timeout=30, message="both children inside SMTP DATA")
        wait_until(lambda: _unfinished(worker) >= 4,
                   timeout=30, message="tasks taken by the worker and not yet started")

        redis_server.stop()
        traffic.phase = "down"
        smtp.release()
        wait_until(lambda: traffic.count("down") >= 30, timeout=60,
                   message="traffic while Redis is down")
        assert not redis_server.ping(), "Redis came back on its own?"
        # The commits pile up in the outbox while nothing can be dispatched.
        assert outbox_pending(app) > 0

        redis_server.start()
        traffic.phase = "after"
        wait_until(lambda: traffic.count("after") >= 15, timeout=60,
                   message="traffic after Redis is back")
    finally:
        traffic.stop()
        smtp.release()

    bad = [(p, k, s, b) for p, k, s, b in traffic.answers if s not in (200, 201)]
    assert bad == [], bad[:5]
    assert {p for p, *_ in traffic.answers} == {"before", "down", "after"}
    assert invariant_violations(app) == []

    # Every outbox row written before, during and after the outage is dispatched.
    wait_until(lambda: outbox_pending(app) == 0, timeout=60,
               message=lambda: f"outbox dispatched ({outbox_pending(app)} rows left)")
    by_tx = {r["transaction_id"]: r for r in rows(
        app, "SELECT id, transaction_id, user_id, title FROM notifications")}

    def pending(phases) -> list[int]:
        ids = {by_tx[_tx_id(k, b)]["id"] for p, k, _, b in traffic.answers if p in phases}
        return sorted(i for i, st in email_statuses(app).items() if st == "pending" and i in ids)

    # What was committed while Redis was down, or after, is all delivered.
    wait_until(lambda: pending({"down", "after"}) == [], timeout=60,
               message=lambda: f"emails of the outage and after still pending: "
                               f"{pending({'down', 'after'})}")

    def stranded() -> str:
        left = sorted(i for i, st in email_statuses(app).items() if st == "pending")
        held = sorted(kw.get("notification_id") for task, kw in redis_server.unacked()
                      if task in ("txmon.notifications.push",
                                  "txmon.email.send_notification")
                      and kw.get("notification_id") in left)
        all_held = Counter(task for task, _ in redis_server.unacked())
        return (f"notifications {left} still pending after Redis came back; Redis 'unacked' "
                f"hash holds deliveries for {held} (taken by the worker before the "
                f"outage, restored only after the visibility timeout); all unacked: "
                f"{dict(all_held)}; new host's log tail:\n{worker.log()[-2500:]}")

    # ... and so is what the worker had already taken from Redis when it went away (beat's
    # outbox sweep sends it again), and the email the dead host was sending.
    wait_until(lambda: "pending" not in email_statuses(app).values(), timeout=60, interval=1,
               message=stranded)
    wait_idle(app, redis_server, dead=held_by_the_dead)
    notes = list(by_tx.values())
    for user in users:
        mine = [n for n in notes if n["user_id"] == user]
        got = smtp.messages(to=f"{user}@example.com")
        for title in {n["title"] for n in mine}:
            want = sum(1 for n in mine if n["title"] == title)
            have = sum(1 for m in got if m.subject == f"txmon: {title}")
            assert have == want, (user, title, want, have)  # each follow-up once
    got = smtp.messages(to="hal@example.com", subject="txmon: Credits Added")
    # The dead host's DATA had arrived before it died (the server had not answered it yet);
    # the new host's send repeats it with the notification's own Message-ID.
    assert 1 <= len(got) <= 2, len(got)
    assert len({m.message["Message-ID"] for m in got}) == 1
    assert all("$43.21" in m.part("plain") for m in got)
    assert set(email_statuses(app).values()) == {"sent"}
    assert invariant_violations(app, delivered=True) == []


def test_sigkill_worker_children_mid_email_and_mid_refund__email_sent_refund_exists_once(
        app, api, workers, smtp, redis_server):
    """One pool child is SIGKILLed inside SMTP DATA (a credit's email), then another inside
    the countdown refund's transaction (blocked on the account row). Each row's lease lapses
    and it runs again: the email ends "sent" (at least once, recognisably the same message),
    the refund exists once. The purchase (and the lock on its account) come before the
    worker starts: its expiry runs while the worker starts."""
    api.account("lee", 1000)  # no email address: only kim's email goes through SMTP
    r = ok(api.purchase("lee", 400, vid="v-kill", timeout_seconds=10))
    expires_at = datetime.fromisoformat(r["verification"]["expires_at"])
    lock = RowLock(app, "SELECT * FROM accounts WHERE user_id = 'lee' FOR UPDATE")
    try:
        smtp.hold(1)  # the first DATA command stays open until we say so
        worker = workers.start(smtp=smtp)
        # -- a child dies inside SMTP DATA ------------------------------------------------
        api.account("kim", 0, email="kim@example.com")
        credit = ok(api.client.post("/api/v1/accounts/kim/credits", headers=api.service,
                                     json={"amount_cents": 1234, "payment_id": "pk-1"}))
        nid = scalar(app, "SELECT id FROM notifications WHERE transaction_id = :t",
                     t=credit["transaction"]["id"])
        wait_until(smtp.holding.is_set, timeout=30, message="the email task inside SMTP DATA")
        victim = pid_owning_local_port(smtp.held_peer[1], worker.children())
        assert victim is not None, (smtp.held_peer, worker.children())
        assert email_statuses(app, "kim")[nid] == "pending"
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: worker.lines(rf"pid:{victim} exited with 'signal 9"), timeout=30,
                   message="the pool noticing the killed email child")
        smtp.release()

        # -- a child dies inside the refund's transaction ---------------------------------
        def blocked_ports() -> list[int]:
            return [row["client_port"] for row in rows(
                app, "SELECT client_port FROM pg_stat_activity WHERE datname = current_database() "
                     "AND wait_event_type = 'Lock' AND query ILIKE '%UPDATE accounts%'")]

        wait_until(lambda: datetime.now(timezone.utc) > expires_at, timeout=30, message="expiry")
        ports = wait_until(blocked_ports, timeout=30,
                           message="the countdown refund blocked inside its transaction")
        refunder = pid_owning_local_port(ports[0], worker.children())
        assert refunder is not None, (ports, worker.children())
        os.kill(refunder, signal.SIGKILL)
        wait_until(lambda: worker.lines(rf"pid:{refunder} exited with 'signal 9"), timeout=30,
                   message="the pool noticing the killed refund child")
        assert scalar(app, "SELECT status FROM verifications WHERE id = 'v-kill'") == "pending"
    finally:
        lock.release()
        smtp.release()

    # The killed runs' leases lapse and the rows run again: both done within a minute.
    wait_until(lambda: email_statuses(app, "kim")[nid] != "pending", timeout=60,
               message=lambda: f"email_status after the kill: {email_statuses(app, 'kim')}; "
                               f"log tail:\n{worker.log()[-2500:]}")
    wait_until(lambda: scalar(app, "SELECT status FROM verifications WHERE id = 'v-kill'")
               == "timed_out", timeout=60,
               message=lambda: f"the refund run again after the kill; log tail:\n"
                               f"{worker.log()[-2500:]}")
    wait_idle(app, redis_server)

    assert email_statuses(app, "kim")[nid] == "sent"
    # SMTP delivery is at least once: the killed attempt's DATA had arrived, then the new
    # run's, both with the notification's own Message-ID (so the duplicate is recognisable).
    got = smtp.messages(to="kim@example.com", subject="txmon: Credits Added")
    assert 1 <= len(got) <= 2
    assert {m.message["Message-ID"] for m in got} == {f"<notification-{nid}@txmon.local>"}
    assert all("$12.34" in m.part("plain") for m in got)
    assert rows(app, "SELECT count(*) AS n FROM notifications WHERE user_id = 'kim'")[0]["n"] == 1

    assert scalar(app, "SELECT status FROM verifications WHERE id = 'v-kill'") == "timed_out"
    refunds = rows(app, "SELECT * FROM transactions WHERE verification_id = 'v-kill' "
                        "AND type = 'verification_refund'")
    assert len(refunds) == 1 and refunds[0]["amount_cents"] == 400
    assert scalar(app, "SELECT balance_cents FROM accounts WHERE user_id = 'lee'") == 1000
    assert len(worker.lines(r"Auto-refund processed: Verification=v-kill, Amount=400\b")) == 1
    assert invariant_violations(app, delivered=True) == []
