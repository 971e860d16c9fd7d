"""SMTP connection reuse and the broker's QoS.

- ``mail.send`` keeps its SMTP connection between messages, recovers when the server has
  dropped it, and keeps it after a refused recipient.
- A worker survives Redis being killed while one of its tasks runs, and takes new work.

The first runs in this process against a real SMTP server; the other with a real worker.
(Verification timeouts waiting as due outbox rows: tests/test_worker_refunds.py.)
"""
from __future__ import annotations

import pytest

from tests.support import invariant_violations
from tests.support.workers import email_statuses, wait_until


@pytest.fixture
def live(app, redis_server, smtp, monkeypatch):
    """The app in this process talking to the test Redis and SMTP sink."""
    from shared import mail

    monkeypatch.setitem(app.config, "REDIS_URL", redis_server.url())
    monkeypatch.setitem(app.config, "SMTP_URL", smtp.url)
    mail.close_connections()
    yield app
    mail.close_connections()


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


def test_redis_killed_while_a_task_runs__worker_survives_and_takes_new_work(
        app, api, workers, smtp, redis_server):
    """kombu's Redis QoS fails on the connection Redis dropped: handing the taken messages
    back at the teardown, and acknowledging on the old channel a task that finished after
    the reconnect (AttributeError both). Celery would treat either as unrecoverable and
    stop the worker (and its relay); worker_service.broker logs them. Redis is SIGKILLed
    while an email task is inside SMTP DATA and restarts empty; the task finishes after the
    worker has reconnected. The worker's main process stays up and delivers a credit made
    after; the email whose message Redis lost is sent too (its outbox lease lapses)."""
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
    # The ledger's invariants only: a follow-up whose message the killed Redis lost is done
    # once its dispatch lease (30 s) lapses, which this test does not wait for.
    assert invariant_violations(app) == []
