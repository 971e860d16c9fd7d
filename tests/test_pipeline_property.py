"""Property: any interleaving of dispatch, delivery, duplicate delivery, lost messages,
crashed runs and the passing of time leaves every follow-up done exactly once.

The broker is a list in this test (messages are what the relay would send); everything
else is real: the outbox, the relay's claims, the batch runner and the handler bodies,
a test-owned Redis (the pushes are counted from a subscription), a real SMTP server
(emails counted by Message-ID), and the ledger (refunds). A "crash" is a runner that
leased its rows and died before doing anything; "time" moves the example's outbox
timestamps two minutes back, so leases lapse and backoffs come due.
"""
from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import invariant_violations
from tests.support.workers import execute, rows, scalar

_examples = itertools.count()

STEP = st.one_of(st.tuples(st.just("dispatch")), st.tuples(st.just("lapsed")),
                 st.tuples(st.just("time")),
                 st.tuples(st.sampled_from(["deliver", "duplicate", "lose", "crash"]),
                           st.integers(0, 20)))


@pytest.fixture
def wired(app, redis_server, smtp, monkeypatch):
    import worker_service.tasks.alerts  # noqa: F401  (each module registers its bodies)
    import worker_service.tasks.email  # noqa: F401
    import worker_service.tasks.notifications  # noqa: F401
    import worker_service.tasks.realtime  # noqa: F401
    import worker_service.tasks.refunds  # noqa: F401

    monkeypatch.setitem(app.config, "REDIS_URL", redis_server.url())
    monkeypatch.setitem(app.config, "SMTP_URL", smtp.url)
    return app


class Broker:
    """The messages the relay sent, in order; handed out, duplicated, lost."""

    def __init__(self, app, user: str):
        self.app, self.user, self.messages = app, user, []

    def _dispatch(self, claimed) -> None:
        from shared import outbox

        by_task: dict[str, list[int]] = {}
        for row in claimed:
            by_task.setdefault(row.task, []).append(row.id)
        for task, ids in by_task.items():
            for i in range(0, len(ids), outbox.BATCH_MAX):
                self.messages.append((task, ids[i:i + outbox.BATCH_MAX]))

    def dispatch(self, *, lapsed: bool = False) -> None:
        from shared import outbox

        with self.app.app_context():
            # Balance updates go through their handler here (the relay publishes them itself).
            while outbox.claim_and_dispatch(self._dispatch, lapsed=lapsed):
                pass

    def take(self, i: int, *, keep: bool = False):
        if not self.messages:
            return None
        i %= len(self.messages)
        return self.messages[i] if keep else self.messages.pop(i)

    def run(self, message) -> None:
        from worker_service import runner

        with self.app.app_context():
            runner.run(*message)

    def crash(self, message) -> None:
        from shared import outbox

        with self.app.app_context():
            outbox.start(message[1])  # leased, then the process died

    def time_passes(self) -> None:
        for column in ("available_at", "dispatched_at", "leased_until"):
            execute(self.app, f"UPDATE outbox SET {column} = {column} - interval '120 seconds'"
                              f" WHERE user_id = :u AND {column} IS NOT NULL", u=self.user)


def _traffic(api, app, user: str) -> None:
    """A credit, two purchases (one large: an alert), one cancelled, one expired."""
    api.account(user, 10_000, email=f"{user}@example.com")
    for vid, cost in ((f"{user}-v1", 6000), (f"{user}-v2", 100)):
        r = api.purchase(user, cost, vid=vid)
        assert r.status_code == 201, r.get_json()
    r = api.client.post(f"/api/v1/verifications/{user}-v2/cancel", headers=api.service, json={})
    assert r.status_code == 200, r.get_json()
    execute(app, "UPDATE verifications SET expires_at = expires_at - interval '1 day'"
                 " WHERE id = :v", v=f"{user}-v1")
    execute(app, "UPDATE outbox SET available_at = available_at - interval '1 day'"
                 " WHERE user_id = :u AND task = 'txmon.refunds.expire_verification'", u=user)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=5, max_size=30))
def test_any_interleaving__every_effect_exactly_once(wired, api, smtp, redis_server,
                                                     database_url, steps):
    if not database_url.startswith("postgres"):
        pytest.skip("interval arithmetic in this test is Postgres SQL")
    from shared.realtime import user_channel

    app = wired
    user = f"prop-{next(_examples)}"
    sub = redis_server.client().pubsub()
    sub.subscribe(user_channel(user))
    assert sub.get_message(timeout=2)["type"] == "subscribe"
    _traffic(api, app, user)
    broker = Broker(app, user)
    for step in steps:
        if step[0] in ("dispatch", "lapsed"):
            broker.dispatch(lapsed=step[0] == "lapsed")
        elif step[0] == "time":
            broker.time_passes()
        else:
            message = broker.take(step[1], keep=step[0] == "duplicate")
            if message is None:
                continue
            if step[0] in ("deliver", "duplicate"):
                broker.run(message)
            elif step[0] == "crash":
                broker.crash(message)
    # Then the system runs on undisturbed until nothing is left.
    for _ in range(20):
        if scalar(app, "SELECT count(*) FROM outbox WHERE user_id = :u AND completed_at IS NULL",
                  u=user) == 0:
            break
        broker.time_passes()
        broker.dispatch()
        broker.dispatch(lapsed=True)
        while broker.messages:
            broker.run(broker.take(0))
    assert scalar(app, "SELECT count(*) FROM outbox WHERE user_id = :u AND completed_at IS NULL",
                  u=user) == 0

    notes = [r["id"] for r in rows(app, "SELECT id FROM notifications WHERE user_id = :u",
                                   u=user)]
    emails = Counter(str(m.message["Message-ID"]) for m in smtp.messages(to=f"{user}@example.com"))
    assert emails == Counter({f"<notification-{n}@txmon.local>": 1 for n in notes})
    pushes = Counter()
    while (m := sub.get_message(timeout=0.5)) is not None:
        body = json.loads(m["data"])
        if body.get("type") == "notification":
            pushes[body["notification"]["id"]] += 1
    sub.close()
    wanted = [r["id"] for r in rows(app, "SELECT id FROM notifications WHERE user_id = :u"
                                         " AND type <> 'credit_deducted'", u=user)]
    assert pushes == Counter({n: 1 for n in wanted})  # debits are not pushed by default
    assert scalar(app, "SELECT count(*) FROM transactions WHERE verification_id = :v"
                       " AND type = 'verification_refund'", v=f"{user}-v1") == 1
    assert rows(app, "SELECT rule, count(*) AS n FROM alerts WHERE user_id = :u GROUP BY rule"
                     " HAVING count(*) > 1", u=user) == []
    assert scalar(app, "SELECT count(*) FROM alerts WHERE user_id = :u"
                       " AND rule = 'large_deduction'", u=user) == 1
    assert invariant_violations(app) == []
