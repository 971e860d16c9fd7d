"""SMTP connection reuse, the countdown batch, and the broker's QoS.

- ``mail.send`` keeps its SMTP connection between messages, recovers when the server has
  dropped it, and keeps it after a refused recipient.
- Verification timeouts wait as due outbox rows: each refunded at its expiry, none early.

The first runs in this process against a real SMTP server; the others with a real worker.
"""
from __future__ import annotations

import json
import time

import pytest

from tests.support import ok
from tests.support.workers import rows, scalar, wait_quiet, wait_until



@pytest.fixture
def live(app, redis_server, smtp, monkeypatch):
    """The app in this process talking to the test Redis and SMTP sink."""
    from shared import mail

    monkeypatch.setitem(app.config, "REDIS_URL", redis_server.url())
    monkeypatch.setitem(app.config, "SMTP_URL", smtp.url)
    mail.close_connections()
    yield app
    mail.close_connections()


class Pushes:
    """Messages published on the users' realtime channels while the block runs."""

    def __init__(self, redis_url: str):
        import redis

        self.client = redis.Redis.from_url(redis_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("txmon:rt:user:*")
        wait_until(lambda: self.client.pubsub_numpat() >= 1, timeout=10,
                   message="the pattern subscription to register")

    def collect(self) -> list[dict]:
        """Everything published so far: a marker published now arrives after all of it
        (Redis delivers in the order it ran the PUBLISH commands), so no quiet window."""
        marker = {"type": "end-of-collect", "id": time.monotonic_ns()}
        self.client.publish("txmon:rt:user:__marker__", json.dumps(marker))
        got: list[dict] = []

        def marker_seen():
            m = self.pubsub.get_message(timeout=0.1)
            if m and m["type"] == "pmessage":
                got.append(json.loads(m["data"]))
            return bool(got) and got[-1] == marker

        wait_until(marker_seen, timeout=30, interval=0, message=lambda: f"marker; got {got}")
        return got[:-1]

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


def test_smtp_connection__reused__survives_a_dropped_connection_and_a_refusal(live, smtp):
    import smtplib

    from shared import mail

    def send(to: str) -> None:
        with live.app_context():
            mail.send(mail.build(to=to, subject="txmon: test", context={
                "title": "t", "message": "m", "amount": None, "balance": None,
                "wallet_url": "http://x/wallet"}))

    for i in range(3):
        send(f"a{i}@example.com")
    assert len(smtp.received) == 3
    assert len({m.peer for m in smtp.received}) == 1  # one connection for all three

    # The server goes away and comes back: the kept connection is dead; the next message
    # notices, reconnects and is delivered once.
    smtp.stop()
    smtp.start()
    send("after-restart@example.com")
    got = smtp.messages(to="after-restart@example.com")
    assert len(got) == 1 and got[0].peer != smtp.received[0].peer
    assert got[0].part("plain") is not None and got[0].part("html") is not None

    # A refused recipient is permanent for that message only; the connection stays usable.
    smtp.refuse.add("nobody@example.com")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send("nobody@example.com")
    send("b@example.com")
    assert smtp.messages(to="b@example.com")[0].peer == got[0].peer

    # Server down: the error reaches the caller (the task's retry policy decides).
    smtp.stop()
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
        send("c@example.com")
    smtp.start()
    send("d@example.com")
    assert len(smtp.messages(to="d@example.com")) == 1


def test_countdown_batch__refunds_each_row_at_its_expiry__nothing_early(app, api, workers):
    """Four purchases committed before any worker runs, with the shortest timeout (10 s): the relay
    claims their countdown rows in one pass on start and sends those in one ETA slot as one
    countdown task (at least two of the four share a slot). Every verification is refunded
    once, never before its expires_at."""
    from datetime import datetime

    from tests.support import invariant_violations

    users = [f"cb{i}" for i in range(4)]
    expiry = {}
    for i, u in enumerate(users):
        api.account(u, 1000)
        r = ok(api.purchase(u, 100, vid=f"v-cb{i}", timeout_seconds=10))
        expiry[f"v-cb{i}"] = datetime.fromisoformat(r["verification"]["expires_at"])
    worker = workers.start()
    wait_until(lambda: scalar(app, "SELECT count(*) FROM verifications WHERE id LIKE 'v-cb%' "
                                   "AND status = 'timed_out'") == 4,
               timeout=40, message=lambda: f"all four refunded; log:\n{worker.log()[-2000:]}")
    refunds = rows(app, "SELECT verification_id, created_at FROM transactions "
                        "WHERE verification_id LIKE 'v-cb%' AND type = 'verification_refund'")
    assert sorted(r["verification_id"] for r in refunds) == sorted(expiry)
    for r in refunds:
        assert r["created_at"] >= expiry[r["verification_id"]]
    for u in users:
        assert scalar(app, f"SELECT balance_cents FROM accounts WHERE user_id = '{u}'") == 1000
    # Rows run inside a batch are logged with their outbox row instead of a task id.
    assert len(worker.lines(r"Task txmon\.refunds\.expire_verification\[outbox:\d+\] "
                            r"succeeded")) >= 2, worker.log()[-3000:]
    assert invariant_violations(app) == []


def test_redis_killed_while_a_task_runs__worker_survives_and_takes_new_work(
        app, api, workers, smtp, redis_server):
    """kombu's Redis QoS fails on the connection Redis dropped: handing the taken messages
    back at the teardown, and acknowledging on the old channel a task that finished after
    the reconnect (AttributeError both). Celery would treat either as unrecoverable and
    stop the worker (and its relay); worker_service.broker logs them. Redis is SIGKILLed
    while an email task is inside SMTP DATA and restarts empty; the task finishes after the
    worker has reconnected. The worker's main process stays up and delivers a credit made
    after; the email whose message Redis lost is sent too (its outbox lease lapses)."""
    from tests.support.workers import email_statuses

    smtp.hold_next = 1
    worker = workers.start(smtp=smtp)
    main_pid = worker.pid
    api.account("qos-1", 1000, email="qos-1@example.com")
    wait_until(smtp.holding.is_set, timeout=30, message="the email task inside SMTP DATA")
    connected = len(worker.lines(r"INFO/MainProcess\] Connected to "))

    redis_server.kill()
    redis_server.start()  # empty: what it held is gone
    wait_until(lambda: len(worker.lines(r"INFO/MainProcess\] Connected to ")) > connected,
               timeout=60,
               message=lambda: f"the worker reconnecting; log tail:\n{worker.log()[-3000:]}")
    smtp.release()  # the held task ends now, on a channel whose connection is gone
    wait_until(lambda: worker.lines(r"Could not acknowledge a message on a closed broker "
                                    r"connection"), timeout=90,
               message=lambda: f"the old channel's acknowledgement logged; log tail:\n"
                               f"{worker.log()[-3000:]}")
    assert worker.lines(r"Could not hand \d+ unacknowledged message\(s\) back to Redis")

    api.account("qos-2", 500, email="qos-2@example.com")
    wait_until(lambda: smtp.messages(to="qos-2@example.com"), timeout=90,
               message=lambda: f"the credit after the outage delivered; log tail:\n"
                               f"{worker.log()[-3000:]}")
    wait_until(lambda: set(email_statuses(app).values()) == {"sent"}, timeout=90,
               message=lambda: f"every email sent ({email_statuses(app)}); log tail:\n"
                               f"{worker.log()[-3000:]}")
    assert worker.proc.poll() is None and worker.pid == main_pid, worker.log()[-3000:]
    assert not worker.lines(r"Unrecoverable error|CRITICAL/MainProcess"), worker.log()[-3000:]
