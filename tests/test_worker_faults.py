"""Faults with real processes: Redis stopped during traffic, a worker child SIGKILLed mid-task.

DESIGN.md invariant 6 / issue 3: with Redis stopped the API keeps accepting purchases,
credits and refunds, and once Redis is back everything pending is delivered; a worker child
killed mid-task does not lose the task (acks_late + reject_on_worker_lost) and the task's
effect still happens exactly once.
"""
from __future__ import annotations

import os
import re
import signal
import threading
from datetime import datetime, timezone

import pytest

pytest.register_assert_rewrite("tests.worker_support")

from tests.helpers import invariant_violations  # noqa: E402
from tests.worker_support import (RowLock, email_statuses,  # noqa: E402
                                  pid_owning_local_port, rows, scalar, wait_until)

pytest_plugins = ["tests.worker_support"]


def _ok(r, *codes):
    assert r.status_code in (codes or (200, 201)), (r.status_code, r.get_json())
    return r.get_json()


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


def test_sigkill_worker_child_mid_email__sent_once_status_consistent(app, api, workers, smtp):
    smtp.hold_next = 1  # the first DATA command stays open until we say so
    worker = workers.start(smtp=smtp)
    api.account("kim", 0, email="kim@example.com")
    credit = _ok(api.client.post("/api/v1/accounts/kim/credits", headers=api.service,
                                 json={"amount_cents": 1234, "payment_id": "pk-1"}))
    nid = scalar(app, "SELECT id FROM notifications WHERE transaction_id = :t",
                 t=credit["transaction"]["id"])

    wait_until(smtp.holding.is_set, timeout=30, message="the email task inside SMTP DATA")
    victim = pid_owning_local_port(smtp.held_peer[1], worker.children())
    assert victim is not None, (smtp.held_peer, worker.children())
    assert email_statuses(app, "kim")[nid] == "pending"
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: worker.lines(rf"pid:{victim} exited with 'signal 9"), timeout=30,
               message="the pool noticing the killed child")
    smtp.release()

    wait_until(lambda: email_statuses(app, "kim")[nid] != "pending", timeout=60,
               message=lambda: f"email_status after the kill: {email_statuses(app, 'kim')}; "
                               f"log tail:\n{worker.log()[-2500:]}")
    assert email_statuses(app, "kim")[nid] == "sent"
    # The killed run's lease lapsed and the row ran again. SMTP delivery is at least once:
    # the killed attempt's DATA had arrived, then the new run's, both with the
    # notification's own Message-ID (so the duplicate is recognisable).
    got = smtp.messages(to="kim@example.com", subject="txmon: Credits Added")
    assert 1 <= len(got) <= 2
    assert {m.message["Message-ID"] for m in got} == {f"<notification-{nid}@txmon.local>"}
    assert all("$12.34" in m.part("plain") for m in got)
    assert rows(app, "SELECT count(*) AS n FROM notifications WHERE user_id = 'kim'")[0]["n"] == 1
    assert invariant_violations(app) == []


def test_sigkill_worker_child_mid_refund__refund_exists_once(app, api, workers):
    worker = workers.start()
    api.account("lee", 1000)
    r = _ok(api.purchase("lee", 400, vid="v-kill", timeout_seconds=10))
    expires_at = datetime.fromisoformat(r["verification"]["expires_at"])

    lock = RowLock(app, "SELECT * FROM accounts WHERE user_id = 'lee' FOR UPDATE")
    try:
        def blocked_ports() -> list[int]:
            return [row["client_port"] for row in rows(
                app, "SELECT client_port FROM pg_stat_activity WHERE datname = current_database() "
                     "AND wait_event_type = 'Lock' AND query ILIKE '%UPDATE accounts%'")]

        wait_until(lambda: datetime.now(timezone.utc) > expires_at, timeout=30, message="expiry")
        ports = wait_until(blocked_ports, timeout=30,
                           message="the countdown refund blocked inside its transaction")
        victim = pid_owning_local_port(ports[0], worker.children())
        assert victim is not None, (ports, worker.children())
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: worker.lines(rf"pid:{victim} exited with 'signal 9"), timeout=30,
                   message="the pool noticing the killed child")
        assert scalar(app, "SELECT status FROM verifications WHERE id = 'v-kill'") == "pending"
    finally:
        lock.release()

    # The killed run's lease lapses and the row runs again: refunded within a minute.
    wait_until(lambda: scalar(app, "SELECT status FROM verifications WHERE id = 'v-kill'")
               == "timed_out", timeout=60,
               message=lambda: f"the refund run again after the kill; log tail:\n"
                               f"{worker.log()[-2500:]}")
    assert scalar(app, "SELECT status FROM verifications WHERE id = 'v-kill'") == "timed_out"
    refunds = rows(app, "SELECT * FROM transactions WHERE verification_id = 'v-kill' "
                        "AND type = 'verification_refund'")
    assert len(refunds) == 1 and refunds[0]["amount_cents"] == 400
    assert scalar(app, "SELECT balance_cents FROM accounts WHERE user_id = 'lee'") == 1000
    assert len(worker.lines(r"Auto-refund processed: Verification=v-kill, Amount=400\b")) == 1
    assert invariant_violations(app) == []
