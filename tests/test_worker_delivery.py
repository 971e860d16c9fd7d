"""One run per notification (push + email), SMTP connection reuse, and the relay's batches.

- ``delivery.deliver`` (the body of txmon.notifications.deliver_all) pushes and emails in one
  run, and still applies each channel's preference (and min_amount_notify_cents) on its
  own; a second run of the same notification sends nothing and the outbox row is completed
  in the delivery's own commit.
- ``mail.send`` keeps its SMTP connection between messages, recovers when the server has
  dropped it, and keeps it after a refused recipient.
- The relay packs due rows into txmon.outbox.run_batch tasks per queue; a batched row whose
  task fails is sent on as its own task (with its own retry policy) and nothing is lost.

The first two run in this process against the test database, a real Redis and a real SMTP
server; the last with a real worker.
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


def test_deliver__push_and_email_each_follow_their_own_preference(live, api, smtp,
                                                                  redis_server):
    from shared import delivery, outbox

    svc = api.service
    # push off / email on, push on / email off, both on but below the amount threshold.
    cases = {"p-off": {"push_on_credit": False},
             "e-off": {"email_on_credit": False},
             "small": {"min_amount_notify_cents": 5000},
             "dflt": {}}
    for user, prefs in cases.items():
        ok(api.client.put(f"/api/v1/accounts/{user}", headers=svc,
                           json={"email": f"{user}@example.com"}))
        if prefs:
            ok(api.client.put("/api/notifications/preferences", headers=api.user(user),
                               json=prefs))
        ok(api.client.post(f"/api/v1/accounts/{user}/credits", headers=svc,
                            json={"amount_cents": 1000, "payment_id": f"pay-{user}"}))
    notes = {r["user_id"]: r for r in rows(live, "SELECT id, user_id FROM notifications")}
    rows_by_note = {r["payload"]["notification_id"]: r["id"] for r in rows(
        live, "SELECT id, payload FROM outbox WHERE task = :t", t=outbox.DELIVER)}
    assert set(rows_by_note) == {n["id"] for n in notes.values()}  # one row per notification

    pushes = Pushes(redis_server.url())
    try:
        with live.app_context():
            results = {user: delivery.deliver(notification_id=n["id"],
                                              outbox_id=rows_by_note[n["id"]])
                       for user, n in notes.items()}
        pushed = pushes.collect()
    finally:
        pushes.close()

    assert {u: (r["push"], r["email"]) for u, r in results.items()} == {
        "p-off": ("skipped", "sent"), "e-off": ("sent", "skipped"),
        "small": ("skipped", "skipped"), "dflt": ("sent", "sent")}
    assert sorted(m["notification"]["id"] for m in pushed) == sorted(
        [notes["e-off"]["id"], notes["dflt"]["id"]])
    assert all(m["type"] == "notification" for m in pushed)
    assert sorted(m.rcpt_tos[0] for m in smtp.received) == ["dflt@example.com",
                                                            "p-off@example.com"]
    statuses = {r["user_id"]: r["email_status"] for r in rows(
        live, "SELECT user_id, email_status FROM notifications")}
    assert statuses == {"p-off": "sent", "e-off": "skipped", "small": "skipped",
                        "dflt": "sent"}
    # Completed in the delivery's own commit.
    assert scalar(live, "SELECT count(*) FROM outbox WHERE task = :t AND completed_at IS NULL",
                  t=outbox.DELIVER) == 0

    # Delivered again (a redelivered message, the sweep): nothing is sent twice.
    pushes = Pushes(redis_server.url())
    try:
        with live.app_context():
            again = {user: delivery.deliver(notification_id=n["id"])
                     for user, n in notes.items()}
        assert pushes.collect() == []
    finally:
        pushes.close()
    assert {u: r["email"] for u, r in again.items()} == statuses
    assert len(smtp.received) == 2


def test_deliver__email_failure_rolls_back_to_pending_and_keeps_the_row_open(
        live, api, smtp, redis_server):
    from shared import delivery

    ok(api.client.put("/api/v1/accounts/zed", headers=api.service,
                       json={"email": "zed@example.com"}))
    ok(api.client.post("/api/v1/accounts/zed/credits", headers=api.service,
                        json={"amount_cents": 1000, "payment_id": "pay-zed"}))
    nid = scalar(live, "SELECT id FROM notifications")
    row = scalar(live, "SELECT id FROM outbox WHERE task = 'txmon.notifications.deliver_all'")
    smtp.stop()
    with live.app_context(), pytest.raises(delivery.EmailFailed) as failed:
        delivery.deliver(notification_id=nid, outbox_id=row)
    assert failed.value.args[0] == "sent"  # the push went
    assert scalar(live, "SELECT email_status FROM notifications") == "pending"
    assert scalar(live, "SELECT completed_at FROM outbox WHERE id = :i", i=row) is None


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


def test_relay_sender__batches_per_queue_and_per_eta_slot__singletons_alone(
        live, redis_server, celery_client):
    """The sender publishes through the real broker (the test Redis, no worker consuming);
    what it sent is read back from the queues."""
    from datetime import datetime, timedelta, timezone

    from worker_service import relay

    redis_server.client().flushall()
    sender = relay.Sender(celery_client, batch_max=3)
    seen: list[tuple] = []

    class Sent:
        """(task, queue, eta, kwargs) of every message on the broker, in publish order."""

        def __getitem__(self, index):
            return self._all()[index]

        def __len__(self):
            return len(self._all())

        def __iter__(self):
            return iter(self._all())

        def _all(self):
            import base64

            with redis_server.client() as r:
                for queue in ("default", "notifications", "alerts", "refunds", "outbox",
                              "email", "reconcile", "realtime"):
                    for raw in reversed(r.lrange(queue, 0, -1)):  # LPUSH: oldest last
                        message = json.loads(raw)
                        if message["headers"]["id"] in {s[4] for s in seen}:
                            continue
                        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
                        eta = message["headers"].get("eta")
                        seen.append((message["headers"]["task"], queue,
                                     eta and datetime.fromisoformat(eta), kwargs,
                                     message["headers"]["id"]))
            return [s[:4] for s in seen]

    sent = Sent()
    slot = datetime(2030, 1, 1, tzinfo=timezone.utc)  # a whole second: the start of a slot
    ms = timedelta(milliseconds=1)
    expire = "txmon.refunds.expire_verification"
    with live.app_context():
        for i in range(4):
            assert sender("txmon.notifications.deliver_all", {"notification_id": i,
                                                              "outbox_id": i}, None) is False
        sender("txmon.alerts.check_transaction", {"transaction_id": 9, "outbox_id": 10}, None)
        assert [s[0] for s in sent] == ["txmon.outbox.run_batch"]
        # Countdown rows: three in one ETA slot fill a group (sent at once, at the latest
        # ETA of the three, whatever the order they came in), a fourth of that slot starts
        # the next group, and one in the next slot is its own.
        for oid, eta in ((11, slot + 300 * ms), (12, slot + 900 * ms), (13, slot + 10 * ms),
                         (14, slot + 999 * ms), (15, slot + 1000 * ms)):
            assert sender(expire, {"verification_id": f"v{oid}", "outbox_id": oid}, eta) is False
        assert len(sent) == 2
        assert sent[1][:3] == ("txmon.outbox.run_batch", "refunds", slot + 900 * ms)
        assert [kw["outbox_id"] for _, kw in sent[1][3]["items"]] == [11, 12, 13]
        sender.flush()
    assert sent[0][1] == "notifications"
    assert [kw["outbox_id"] for _, kw in sent[0][3]["items"]] == [0, 1, 2]
    assert sent[0][2] is None
    # What flush sent: one row left per group, each as its own task (no batch of one),
    # the countdown rows with their own ETA.
    assert sorted((s[0], s[3]["outbox_id"], s[2]) for s in sent[2:]) == [
        ("txmon.alerts.check_transaction", 10, None),
        ("txmon.notifications.deliver_all", 3, None),
        (expire, 14, slot + 999 * ms), (expire, 15, slot + 1000 * ms)]


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


def test_batch__failing_row_sent_on_alone__others_done__nothing_lost(app, api, workers, smtp):
    """Rows committed before the worker starts go out in batches; one row whose task cannot
    run (a payload its task does not accept) fails in the batch, is sent on as its own task,
    fails there for good, and its row is completed (not sent forever); the others ran.

    Changes with issue 12, "Rebuild the delivery pipeline: one outbox spine, channels,
    batches, recovery within a minute": DESIGN.md keeps such a row as a dead letter
    (visible, re-drivable) instead of completing it."""
    from shared import outbox
    from shared.db import db, utcnow

    for i in range(6):
        api.account(f"b{i}", 1000, email=f"b{i}@example.com")
    with app.app_context(), db.engine.begin() as conn:
        outbox.write(conn, [outbox.message(outbox.CHECK_ALERTS, "b0", utcnow(), bogus=1)])
    n_rows = scalar(app, "SELECT count(*) FROM outbox")

    worker = workers.start(smtp=smtp)
    wait_quiet(app, worker)
    wait_until(lambda: scalar(app, "SELECT count(*) FROM outbox WHERE completed_at IS NULL")
               == 0, timeout=30, message="every outbox row completed")
    assert worker.lines(r"Task txmon\.outbox\.run_batch\[.*\] succeeded")
    assert worker.lines(r"Batched task txmon\.alerts\.check_transaction \(outbox row \d+\) "
                        r"failed \(TypeError\); sending it on its own")
    assert worker.lines(r"Task txmon\.alerts\.check_transaction\[[0-9a-f-]+\] raised")
    assert len(worker.lines(r"check_transaction\[outbox:\d+\] succeeded")) == 6
    assert set(rows(app, "SELECT DISTINCT email_status FROM notifications")[0].values()) == {
        "sent"}
    assert len(smtp.received) == 6
    assert scalar(app, "SELECT count(*) FROM outbox") == n_rows


def test_broker_qos__ack_on_a_torn_down_channel_is_logged_not_fatal(caplog):
    """kombu raises AttributeError when a task finished during a Redis outage is
    acknowledged on the old channel after the reconnect; Celery would treat that as
    unrecoverable and stop the worker (and its relay). worker_service.broker logs it."""
    from worker_service.broker import QoS

    class TornDownChannel:
        do_restore = False

        def conn_or_acquire(self, client=None):
            raise AttributeError("'NoneType' object has no attribute 'client'")

    qos = QoS(TornDownChannel())
    with caplog.at_level("WARNING", logger="txmon.broker"):
        assert qos.ack("tag-1") is None
        assert qos.reject("tag-2", requeue=False) is None
    assert len([r for r in caplog.records if "closed broker connection" in r.message]) == 2
