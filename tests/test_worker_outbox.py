"""The outbox relay, its backlog gauge, and countdown tasks vs. the Redis visibility timeout.

Issue 3: rows are claimed with SKIP LOCKED so two relays never double-send; a gauge shows
the backlog; the Redis visibility timeout is set consistently and longer than any countdown,
so a countdown task is not delivered twice ("test it with a short visibility timeout").
"""
from __future__ import annotations

import os
import signal
import threading

import pytest

from tests.support import invariant_violations
from tests.support.workers import (RowLock, outbox_pending, rows, scalar,
                                  wait_until)


MAX_TIMEOUT_S = 86400  # DESIGN.md: timeout_seconds 10-86400


def _postgres_only(database_url):
    if not database_url.startswith("postgres"):
        pytest.skip("SKIP LOCKED is the Postgres path (SQLite serializes writers)")


def _write_rows(app, task: str, payloads: list[dict]) -> None:
    from shared import outbox
    from shared.db import db, utcnow

    with app.app_context(), db.engine.begin() as conn:
        now = utcnow()
        outbox.write(conn, [outbox.message(task, None, now, **p) for p in payloads])


def _queued_outbox_ids(redis_server, queue: str) -> list[list[int]]:
    """``outbox_ids`` of every task message waiting in ``queue``: kombu's Redis transport
    keeps a queue as a Redis list of that name, one JSON envelope per message whose body
    (base64) is Celery's ``[args, kwargs, embed]``."""
    import base64
    import json

    found = []
    with redis_server.client() as r:
        for raw in r.lrange(queue, 0, -1):
            envelope = json.loads(raw)
            body = envelope["body"]
            if envelope["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            found.append(json.loads(body)[1]["outbox_ids"])
    return found


def test_two_relays_concurrently_never_send_a_row_twice(app, database_url, redis_server):
    """Two relays, each with its own Celery app configured like a worker's, claim the same
    backlog at once and dispatch it through the relay's own dispatcher onto a real Redis;
    the queue then holds every row exactly once."""
    _postgres_only(database_url)
    from shared import outbox
    from tests.support.workers import celery_publisher
    from worker_service.relay import dispatcher

    if not redis_server.ping():  # an earlier test left it stopped
        redis_server.start()
    redis_server.client().flushall()
    task = "txmon.realtime.publish_alert"
    queue = outbox.HANDLERS[task].queue
    n = 3000
    _write_rows(app, task, [{"n": i} for i in range(n)])
    with app.app_context():
        assert outbox.backlog() == n
    ids = {r["id"] for r in rows(app, "SELECT id FROM outbox")}

    claimed: dict[int, list[int]] = {0: [], 1: []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2, timeout=30)
    apps = [celery_publisher(redis_server.url()) for _ in (0, 1)]

    def relay(k: int) -> None:
        send = dispatcher(apps[k])

        def dispatch(rows_claimed):
            claimed[k].extend(row.id for row in rows_claimed)
            send(rows_claimed)

        try:
            with app.app_context():
                barrier.wait()
                while outbox.claim_and_dispatch(dispatch, limit=50 + 25 * k):
                    pass
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=relay, args=(k,)) for k in (0, 1)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        for celery_app in apps:
            celery_app.close()
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert claimed[0] and claimed[1], "both relays should have taken a share"
    messages = _queued_outbox_ids(redis_server, queue)
    assert all(len(batch) <= outbox.BATCH_MAX for batch in messages)
    sent = [i for batch in messages for i in batch]
    assert len(sent) == len(set(sent)), "a row was sent twice"
    assert set(sent) == ids, "a row was lost"
    assert sorted(claimed[0] + claimed[1]) == sorted(sent)  # what each claimed is what went out
    with redis_server.client() as r:  # nothing went to another queue
        assert [q for q in r.keys("*") if q != queue.encode()
                and r.type(q) == b"list"] == []
    with app.app_context():
        assert outbox.backlog() == 0
    assert rows(app, "SELECT DISTINCT attempts FROM outbox") == [{"attempts": 0}]  # none ran
    assert scalar(app, "SELECT count(*) FROM outbox WHERE dispatched_at IS NULL") == 0
    assert invariant_violations(app) == []
    redis_server.client().flushall()  # the messages are for no worker


def _sweeps_done(worker) -> int:
    return len(worker.lines(r"Task txmon\.outbox\.sweep\[.*\] succeeded"))


def _sweep(worker, celery_client) -> None:
    before = _sweeps_done(worker)
    celery_client.send_task("txmon.outbox.sweep")
    wait_until(lambda: _sweeps_done(worker) > before, timeout=30, message="outbox.sweep ran")


def _locked_backlog(app, n: int) -> RowLock:
    """``n`` committed outbox rows (harmless tasks) that the test holds locked, so no relay
    can claim them (SKIP LOCKED) and they stay in the backlog."""
    _write_rows(app, "txmon.realtime.publish_alert", [{"alert_id": 10**9 + i} for i in range(n)])
    lock = RowLock(app, "SELECT id FROM outbox WHERE dispatched_at IS NULL FOR UPDATE")
    assert len(lock.locked) == n
    return lock


def test_backlog_gauge_shows_rows_waiting_then_zero(app, database_url, workers, celery_client):
    """One pool process (-c 1), so every sweep updates the same process's gauge."""
    _postgres_only(database_url)
    lock = _locked_backlog(app, 7)
    try:
        worker = workers.start(concurrency=1)
        _sweep(worker, celery_client)
        assert outbox_pending(app) == 7  # skipped, not sent: the relay cannot claim them
        assert worker.metric("outbox_backlog") == 7.0
    finally:
        lock.release()
    _sweep(worker, celery_client)
    assert outbox_pending(app) == 0
    assert worker.metric("outbox_backlog") == 0.0


def test_backlog_gauge_after_pool_process_replaced__not_stuck(
        app, database_url, workers, celery_client):
    """The gauge is ``multiprocess_mode="max"``: the value a pool process wrote stays in
    PROMETHEUS_MULTIPROC_DIR after that process is gone. Once the backlog is drained, the
    gauge must say 0 even if the process that last saw a backlog was replaced."""
    _postgres_only(database_url)
    lock = _locked_backlog(app, 7)
    try:
        worker = workers.start(concurrency=1)
        _sweep(worker, celery_client)
        assert worker.metric("outbox_backlog") == 7.0
        (child,) = worker.children()
        os.kill(child, signal.SIGKILL)  # e.g. a hard time limit, an OOM kill
        wait_until(lambda: worker.children() and worker.children() != [child], timeout=30,
                   message="the pool replacing its process")
    finally:
        lock.release()
    _sweep(worker, celery_client)
    assert outbox_pending(app) == 0
    files = sorted(os.listdir(worker.env["PROMETHEUS_MULTIPROC_DIR"]))
    assert worker.metric("outbox_backlog") == 0.0, (
        f"gauge files {[f for f in files if f.startswith('gauge')]}; killed pid {child}")


def test_visibility_timeout__longer_than_any_countdown_and_set_everywhere(app):
    from worker_service.celery_app import celery as worker_celery
    from worker_service.celery_app import celery_config

    conf = celery_config(app.config)
    assert conf["broker_transport_options"]["visibility_timeout"] > MAX_TIMEOUT_S
    assert worker_celery.conf.broker_transport_options["visibility_timeout"] > MAX_TIMEOUT_S
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    # No result backend, so no second visibility timeout to keep in step.
    assert conf["result_backend"] is None


def test_visibility_timeout__configurable_from_environment(monkeypatch):
    """Operators (and the short-timeout test below) set it with CELERY_VISIBILITY_TIMEOUT_S;
    celery_config already honours app.config["CELERY_VISIBILITY_TIMEOUT_S"]."""
    from shared.config import Config
    from worker_service.celery_app import celery_config

    monkeypatch.setenv("CELERY_VISIBILITY_TIMEOUT_S", "7")
    conf = celery_config(Config().as_dict())
    assert conf["broker_transport_options"]["visibility_timeout"] == 7


def test_one_listening_connection_per_worker__both_loops_still_woken(
        app, api, database_url, redis_server, workers):
    """A worker's relay loops share one LISTEN connection (worker_service/relay.py): the
    balance loop listens and wakes the task loop. One listening backend per worker host,
    and a commit still reaches both loops: its balance update is published (balance loop)
    and its delivery and alert check run (task loop; no beat runs here, so nothing else
    would send them)."""
    _postgres_only(database_url)
    from tests.support.workers import pid_owning_local_port

    worker = workers.start(concurrency=1)

    def owned() -> list[dict]:
        listening = rows(app, "SELECT client_port FROM pg_stat_activity WHERE datname ="
                              " current_database() AND query = 'LISTEN txmon_outbox'")
        return [r for r in listening if pid_owning_local_port(r["client_port"], [worker.pid])]

    # "Outbox relay started" is logged as the loops' threads start, before they connect.
    wait_until(lambda: owned(), timeout=15, message="the worker's relay listening")

    subscriber = redis_server.client().pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe("txmon:rt:user:listen-1")
    subscriber.get_message(timeout=2)
    api.account("listen-1", 500)  # the account, then a credit of 500 cents
    message = subscriber.get_message(timeout=10)
    subscriber.close()
    assert message is not None and b'"balance_cents": 500' in message["data"]
    wait_until(lambda: outbox_pending(app) == 0 and scalar(
        app, "SELECT count(*) FROM outbox WHERE user_id = 'listen-1'"
             " AND completed_at IS NULL") == 0,
               timeout=15, message="every row of the credit dispatched and completed")
    tasks = {r["task"] for r in rows(app, "SELECT task FROM outbox WHERE user_id = 'listen-1'")}
    assert tasks == {"txmon.notifications.push", "txmon.email.send_notification",
                     "txmon.realtime.publish_balance", "txmon.alerts.check_transaction"}
    # Counted now that both loops have run (a loop of its own would be listening by then).
    listeners = owned()
    assert len(listeners) == 1, f"listening backends of the worker: {listeners}"
    assert rows(app, "SELECT application_name FROM pg_stat_activity WHERE client_port = :p",
                p=listeners[0]["client_port"]) == [{"application_name": "txmon-relay"}]


def test_purge_deletes_only_rows_completed_before_the_retention(app):
    """txmon.outbox.purge (hourly beat job) deletes rows completed more than
    TXMON_OUTBOX_KEEP_DAYS ago; rows completed since, rows waiting or in flight however old,
    and dead letters are kept."""
    from datetime import timedelta

    from shared import outbox
    from shared.db import db, utcnow
    from worker_service.celery_app import celery_config
    from worker_service.tasks import outbox as outbox_tasks

    assert celery_config(app.config)["beat_schedule"]["outbox-purge"]["task"] == \
        "txmon.outbox.purge"
    now = utcnow()
    old, recent = now - timedelta(days=8), now - timedelta(days=6)
    kinds = {  # (dispatched_at, completed_at, dead_at) of each kept or deleted kind
        "old_done": (old, old, None), "recent_done": (recent, recent, None),
        "old_waiting": (None, None, None), "old_in_flight": (old, None, None),
        "old_dead": (old, None, old)}
    counts = {"old_done": 7, "recent_done": 3, "old_waiting": 2, "old_in_flight": 2,
              "old_dead": 2}
    with app.app_context():
        with db.engine.begin() as conn:
            for kind, (dispatched, completed, dead) in kinds.items():
                conn.execute(outbox.outbox_table.insert(), [
                    {"user_id": kind, "task": outbox.PUSH, "payload": {"notification_id": i},
                     "available_at": old, "created_at": old, "dispatched_at": dispatched,
                     "completed_at": completed, "dead_at": dead, "attempts": 1}
                    for i in range(counts[kind])])
        # Batches of 4: a full one, then a short one; the loop goes on, then stops.
        assert outbox_tasks.purge.run(size=4) == 7
        left = {r["user_id"]: r["n"] for r in rows(
            app, "SELECT user_id, count(*) AS n FROM outbox GROUP BY user_id")}
    assert left == {k: n for k, n in counts.items() if k != "old_done"}, left
    assert invariant_violations(app) == []
