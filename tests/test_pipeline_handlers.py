"""Each outbox handler on a mixed batch: rows to do, a row whose data is gone (completes
quietly) and a poisoned row (fails alone, dead once its attempts are spent, the rest of
the batch completed in the same run). Run in-process through the batch runner, against
a test-owned Redis and a real SMTP server (aiosmtpd); the admin outbox routes show and
re-drive the dead row.
"""
from __future__ import annotations

import json

import pytest

from tests.support import invariant_violations
from tests.support.workers import execute, rows, scalar


pytestmark = pytest.mark.smoke


@pytest.fixture
def wired(app, redis_server, smtp, monkeypatch):
    """The app pointed at the test's Redis and SMTP server, with the handlers registered."""
    import worker_service.tasks.alerts  # noqa: F401  (each module registers its bodies)
    import worker_service.tasks.email  # noqa: F401
    import worker_service.tasks.notifications  # noqa: F401
    import worker_service.tasks.realtime  # noqa: F401
    import worker_service.tasks.refunds  # noqa: F401

    monkeypatch.setitem(app.config, "REDIS_URL", redis_server.url())
    monkeypatch.setitem(app.config, "SMTP_URL", smtp.url)
    redis_server.client().flushall()
    return app


def _write(app, task: str, payloads: list[dict]) -> list[int]:
    from shared import outbox
    from shared.db import db, utcnow

    with app.app_context(), db.engine.begin() as conn:
        outbox.write(conn, [outbox.message(task, None, utcnow(), **p) for p in payloads])
    return [r["id"] for r in rows(app, "SELECT id FROM outbox WHERE task = :t ORDER BY id",
                                  t=task)][-len(payloads):]


def _run(app, task: str, ids: list[int]) -> dict:
    from worker_service import runner

    with app.app_context():
        return runner.run(task, ids)


def _row(app, outbox_id: int) -> dict:
    return rows(app, "SELECT * FROM outbox WHERE id = :i", i=outbox_id)[0]


def _spend_attempts(app, task: str, outbox_id: int) -> None:
    """Bring a row to its last attempt (the schedule's waits are minutes long)."""
    from shared import outbox
    from tests.support.workers import execute

    execute(app, "UPDATE outbox SET attempts = :a WHERE id = :i",
            a=outbox.HANDLERS[task].attempts - 1, i=outbox_id)


def _assert_mixed_batch(app, task: str, ids: list[int], poisoned: int) -> None:
    """Every row but the poisoned one completed; the poisoned one dead with its error."""
    for outbox_id in ids:
        row = _row(app, outbox_id)
        if outbox_id == poisoned:
            assert row["completed_at"] is None and row["dead_at"] is not None, row
            assert row["last_error"], row
        else:
            assert row["completed_at"] is not None and row["dead_at"] is None, row


def _notifications(app, user_id: str) -> list[int]:
    return [r["id"] for r in rows(app, "SELECT id FROM notifications WHERE user_id = :u"
                                       " ORDER BY id", u=user_id)]


def test_email__mixed_batch_gone_and_poisoned__each_email_once_with_stable_message_id(
        wired, api, smtp):
    from shared import outbox

    api.account("em-a", 1000, email="a@example.com")
    api.account("em-b", 1000, email="b@example.com")
    api.account("em-c", 1000)  # no address: skipped
    smtp.refuse.add("b@example.com")  # refused: final at once
    notes = _notifications(wired, "em-a") + _notifications(wired, "em-b") + \
        _notifications(wired, "em-c")
    ids = _write(wired, outbox.SEND_EMAIL, [{"notification_id": n} for n in notes]
                 + [{"notification_id": 987654}, {"notification_id": "x"}])
    poisoned = ids[-1]
    _spend_attempts(wired, outbox.SEND_EMAIL, poisoned)
    result = _run(wired, outbox.SEND_EMAIL, ids)
    assert result["ran"] == len(ids) and result["failed"] == 1, result
    _assert_mixed_batch(wired, outbox.SEND_EMAIL, ids, poisoned)

    got = smtp.messages(to="a@example.com")
    assert len(got) == 1 and got[0].message["Message-ID"] == f"<notification-{notes[0]}@txmon.local>"
    statuses = {r["user_id"]: r["email_status"] for r in rows(
        wired, "SELECT n.transaction_id, n.user_id, d.status AS email_status"
        " FROM notifications n JOIN notification_deliveries d ON d.notification_id = n.id AND d.channel = 'email'")}
    assert statuses == {"em-a": "sent", "em-b": "failed", "em-c": "skipped"}

    # The same rows again (a duplicate message): nothing left to do, nothing sent twice.
    again = _run(wired, outbox.SEND_EMAIL, ids)
    assert again["ran"] == 0, again
    assert len(smtp.messages(to="a@example.com")) == 1


def test_push__mixed_batch_gone_and_poisoned__published_once_per_wanted(wired, api,
                                                                         redis_server):
    from shared import outbox

    api.account("pu-a", 0)
    api.account("pu-b", 0)
    r = api.client.put("/api/notifications/preferences", headers=api.user("pu-b"),
                       json={"push_on_credit": False})
    assert r.status_code == 200, r.get_json()
    for user in ("pu-a", "pu-b"):
        r = api.client.post(f"/api/v1/accounts/{user}/credits", headers=api.service,
                            json={"amount_cents": 500, "payment_id": f"p-{user}"})
        assert r.status_code == 201, r.get_json()
    from shared.realtime import user_channel

    sub = redis_server.client().pubsub()
    sub.subscribe(user_channel("pu-a"), user_channel("pu-b"))
    for _ in range(2):
        sub.get_message(timeout=2)  # the subscribe confirmations
    notes = _notifications(wired, "pu-a") + _notifications(wired, "pu-b")
    ids = _write(wired, outbox.PUSH, [{"notification_id": n} for n in notes]
                 + [{"notification_id": 987654}, {"nothing": 1}])
    poisoned = ids[-1]
    _spend_attempts(wired, outbox.PUSH, poisoned)
    result = _run(wired, outbox.PUSH, ids)
    assert result["failed"] == 1 and result["sent"] == 1 and result["skipped"] == 1, result
    _assert_mixed_batch(wired, outbox.PUSH, ids, poisoned)
    got = []
    while (m := sub.get_message(timeout=1)) is not None:
        got.append((m["channel"].decode(), json.loads(m["data"])["notification"]["id"]))
    assert got == [(user_channel("pu-a"), notes[0])]


def test_alert_check__mixed_batch_gone_and_poisoned__one_alert_per_finding(wired, api):
    from shared import outbox

    api.account("al-a", 100_000)
    r = api.purchase("al-a", 9000, vid="al-v1")  # above the large-debit threshold
    assert r.status_code == 201, r.get_json()
    tx = r.get_json()["transaction"]["id"]
    ids = _write(wired, outbox.CHECK_ALERTS, [{"transaction_id": tx}, {"transaction_id": tx},
                                              {"transaction_id": 987654},
                                              {"nothing": 1}])
    poisoned = ids[-1]
    _spend_attempts(wired, outbox.CHECK_ALERTS, poisoned)
    _run(wired, outbox.CHECK_ALERTS, ids)
    _assert_mixed_batch(wired, outbox.CHECK_ALERTS, ids, poisoned)
    assert scalar(wired, "SELECT count(*) FROM alerts WHERE rule = 'large_deduction'") == 1


def test_expire__mixed_batch_gone_and_poisoned__refunds_each_expired_pending_once(wired, api):
    from shared import outbox

    api.account("ex-a", 1000)
    for vid in ("ex-1", "ex-2", "ex-3"):
        assert api.purchase("ex-a", 100, vid=vid).status_code == 201
    execute(wired, "UPDATE verifications SET expires_at = CURRENT_TIMESTAMP"
                   " WHERE id IN ('ex-1', 'ex-2')")
    r = api.client.post("/api/v1/verifications/ex-2/complete", headers=api.service, json={})
    assert r.status_code == 200, r.get_json()
    ids = _write(wired, outbox.EXPIRE_VERIFICATION,
                 [{"verification_id": "ex-1"}, {"verification_id": "ex-2"},
                  {"verification_id": "ex-gone"}, {"verification_id": 12}])
    poisoned = ids[-1]
    _spend_attempts(wired, outbox.EXPIRE_VERIFICATION, poisoned)
    result = _run(wired, outbox.EXPIRE_VERIFICATION, ids)
    assert result["refunded"] == 1 and result["ended"] == 2, result
    _assert_mixed_batch(wired, outbox.EXPIRE_VERIFICATION, ids, poisoned)
    assert scalar(wired, "SELECT count(*) FROM transactions WHERE type = 'verification_refund'") == 1
    assert invariant_violations(wired) == []


def test_expire__unexpired_verification__refunds_nothing_and_waits_for_expiry(wired, api):
    from shared import ledger, outbox

    api.account("ne-a", 1000)
    assert api.purchase("ne-a", 100, vid="ne-1").status_code == 201
    [row] = _write(wired, outbox.EXPIRE_VERIFICATION, [{"verification_id": "ne-1"}])
    result = _run(wired, outbox.EXPIRE_VERIFICATION, [row])
    assert result == {"ran": 1, "skipped": 0, "postponed": 1}, result
    with wired.app_context():
        with pytest.raises(ledger.NotYetExpired):
            ledger.refund_verification(verification_id="ne-1", status="timed_out")
    assert scalar(wired, "SELECT status FROM verifications WHERE id = 'ne-1'") == "pending"
    assert scalar(wired, "SELECT count(*) FROM transactions WHERE type = 'verification_refund'") == 0
    due = _row(wired, row)
    assert due["completed_at"] is None and due["dispatched_at"] is None and due["attempts"] == 0
    expires = scalar(wired, "SELECT expires_at FROM verifications WHERE id = 'ne-1'")
    assert _aware(due["available_at"]) >= _aware(expires)
    assert invariant_violations(wired) == []


def _aware(value):
    from datetime import datetime, timezone

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def test_publish__mixed_batch_gone_and_poisoned__one_pipeline(wired, api, redis_server):
    from shared import outbox

    api.account("pb-a", 0)
    r = api.client.post("/api/v1/accounts/pb-a/credits", headers=api.service,
                        json={"amount_cents": 500, "payment_id": "p-pb"})
    tx = r.get_json()["transaction"]["id"]
    from shared.realtime import user_channel

    sub = redis_server.client().pubsub()
    sub.subscribe(user_channel("pb-a"))
    sub.get_message(timeout=2)
    ids = _write(wired, outbox.PUBLISH_BALANCE, [{"transaction_id": tx},
                                                 {"transaction_id": 987654},
                                                 {"nothing": 1}])
    _spend_attempts(wired, outbox.PUBLISH_BALANCE, ids[-1])
    _run(wired, outbox.PUBLISH_BALANCE, ids)
    _assert_mixed_batch(wired, outbox.PUBLISH_BALANCE, ids, ids[-1])
    m = sub.get_message(timeout=2)
    assert m is not None and json.loads(m["data"])["seq"] == 1


def test_failed_run__due_again_after_its_backoff_not_dead(wired):
    from shared import outbox

    (row_id,) = _write(wired, outbox.CHECK_ALERTS, [{"nothing": 1}])
    _run(wired, outbox.CHECK_ALERTS, [row_id])
    row = _row(wired, row_id)
    assert row["dead_at"] is None and row["completed_at"] is None
    assert row["dispatched_at"] is None and row["attempts"] == 1
    assert row["available_at"] > row["created_at"]  # waits its backoff in the table
    assert row["last_error"]


def test_admin_outbox__dead_row_visible_and_redriven_once__409_when_not_dead(wired, api):
    from shared import outbox

    (dead,) = _write(wired, outbox.CHECK_ALERTS, [{"nothing": 1}])
    _spend_attempts(wired, outbox.CHECK_ALERTS, dead)
    _run(wired, outbox.CHECK_ALERTS, [dead])
    (waiting,) = _write(wired, outbox.PUSH, [{"notification_id": 1}])

    r = api.client.get("/api/admin/outbox", headers=api.admin())
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert set(body) == {"backlog", "oldest_due_age_s", "in_flight", "dead", "by_task"}
    assert body["dead"] == 1 and body["backlog"] == 1 and body["in_flight"] == 0
    assert body["by_task"][outbox.CHECK_ALERTS] == {"backlog": 0, "in_flight": 0, "dead": 1}
    assert body["oldest_due_age_s"] >= 0

    r = api.client.post(f"/api/admin/outbox/{dead}/retry", headers=api.admin())
    assert r.status_code == 200, r.get_json()
    row = r.get_json()
    assert row["id"] == dead and row["dead_at"] is None and row["attempts"] == 0
    assert row["task"] == outbox.CHECK_ALERTS and row["last_error"]
    assert api.client.get("/api/admin/outbox", headers=api.admin()).get_json()["dead"] == 0

    for outbox_id in (dead, waiting):  # re-driven already / never dead
        r = api.client.post(f"/api/admin/outbox/{outbox_id}/retry", headers=api.admin())
        assert r.status_code == 409 and r.get_json()["error"]["code"] == "invalid_state"
    r = api.client.post("/api/admin/outbox/99999999/retry", headers=api.admin())
    assert r.status_code == 404
    r = api.client.post(f"/api/admin/outbox/{dead}/retry", headers=api.user("someone"))
    assert r.status_code == 403


def _alerts(app, user_id: str, n: int) -> list[int]:
    from shared import alerts

    with app.app_context():
        return [alerts.raise_alert(rule="large_debit", user_id=user_id, details={"n": i},
                                   dedup_key=f"{user_id}-{i}")[0] for i in range(n)]


def test_publish_alert__mixed_batch_gone_and_poisoned__each_on_the_admin_feed_once(
        wired, api, redis_server):
    from shared import outbox
    from shared.realtime import ADMIN_CHANNEL

    found = _alerts(wired, "pa-a", 2)
    sub = redis_server.client().pubsub()
    sub.subscribe(ADMIN_CHANNEL)
    sub.get_message(timeout=2)
    ids = _write(wired, outbox.PUBLISH_ALERT, [{"alert_id": a} for a in found]
                 + [{"alert_id": 987654}, {"nothing": 1}])
    poisoned = ids[-1]
    _spend_attempts(wired, outbox.PUBLISH_ALERT, poisoned)
    _run(wired, outbox.PUBLISH_ALERT, ids)
    _assert_mixed_batch(wired, outbox.PUBLISH_ALERT, ids, poisoned)
    got = []
    while (m := sub.get_message(timeout=1)) is not None:
        got.append(json.loads(m["data"])["alert"]["id"])
    assert got == found


def test_email_alert__mixed_batch_gone_and_poisoned__each_alert_mailed_once(wired, smtp):
    from shared import outbox

    found = _alerts(wired, "ea-a", 2)
    ids = _write(wired, outbox.EMAIL_ALERT, [{"alert_id": a} for a in found]
                 + [{"alert_id": 987654}, {"nothing": 1}])
    poisoned = ids[-1]
    _spend_attempts(wired, outbox.EMAIL_ALERT, poisoned)
    _run(wired, outbox.EMAIL_ALERT, ids)
    _assert_mixed_batch(wired, outbox.EMAIL_ALERT, ids, poisoned)
    admin = wired.config["TXMON_ADMIN_EMAIL"]
    ids_sent = sorted(m.message["Message-ID"] for m in smtp.messages(to=admin))
    assert ids_sent == sorted(f"<alert-{a}@txmon.local>" for a in found)
    _run(wired, outbox.EMAIL_ALERT, ids)  # delivered again: nothing mailed twice
    assert len(smtp.messages(to=admin)) == 2
