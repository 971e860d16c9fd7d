"""api_service.admission: at most N plain HTTP requests at once per process; websockets free.

The middleware is tested around a WSGI app that records how many calls overlap, from many
threads (under gunicorn's gevent worker the same semaphore is cooperative; the websocket
tests run the whole stack that way with the default limit).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from api_service.admission import Admission
from tests.support import wait_until


class Overlap:
    """A WSGI app whose calls wait for one another in groups of ``together`` (a barrier with
    a generous deadline) and that records the most calls running at once: ``together``
    calls must be let in at once, or the barrier breaks and the calls fail."""

    def __init__(self, together: int):
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.closed = 0
        self.barrier = threading.Barrier(together, timeout=30)

    def __call__(self, environ, start_response):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.barrier.wait()
        with self.lock:
            self.running -= 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return self.Body(self, environ["PATH_INFO"].encode())

    class Body(list):
        def __init__(self, app, data):
            super().__init__([data, b"!"])
            self.app = app

        def close(self):
            self.app.closed += 1


def _call(app, path: str) -> bytes:
    return b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, lambda *a: None))


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_at_most_limit_requests_run_at_once(limit):
    inner = Overlap(together=limit)
    app = Admission(inner, limit)
    with ThreadPoolExecutor(12) as pool:
        bodies = list(pool.map(lambda i: _call(app, f"/api/v1/x{i}"), range(48)))
    assert bodies == [f"/api/v1/x{i}!".encode() for i in range(48)]
    assert inner.most == limit
    assert inner.closed == 48  # the body's close() still runs (WSGI)


@pytest.mark.parametrize("path", ["/ws/balance", "/healthz", "/readyz", "/metrics"])
def test_websockets_probes_and_metrics_are_not_counted(path):
    """A socket's handler runs for as long as the client stays, and probes must answer
    while requests queue: none of them may wait for (or hold) a slot."""
    inner = Overlap(together=8)  # all eight at once, past a limit of one
    app = Admission(inner, 1)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: _call(app, path), range(8)))
    assert inner.most == 8


def test_app_uses_the_configured_limit(database_url):
    from api_service import create_app
    from shared.config import TestConfig

    config = dict(TestConfig(database_url).as_dict(), HTTP_CONCURRENCY=3)
    assert isinstance(create_app(config).wsgi_app, Admission)
    config["HTTP_CONCURRENCY"] = 0
    assert not isinstance(create_app(config).wsgi_app, Admission)


def test_waiters_are_served_in_arrival_order_and_nobody_barges_in():
    """A freed slot goes to the oldest waiter, not to whoever asks at that moment."""
    from api_service.admission import FairSlots

    slots = FairSlots(1)
    order, holder_go = [], threading.Event()

    def holder():
        with slots:
            holder_go.wait(30)

    def waiter(name):
        with slots:
            order.append(name)

    first = threading.Thread(target=holder)
    first.start()
    wait_until(lambda: slots._free == 0, message="the holder to take the slot")
    threads = []
    for name in ("w1", "w2", "w3", "w4"):
        t = threading.Thread(target=waiter, args=(name,))
        t.start()
        threads.append(t)
        wait_until(lambda n=len(threads): len(slots._waiters) == n, message="waiters queued")
    holder_go.set()
    with slots:  # a newcomer right after the release: it must queue behind w1..w4
        order.append("newcomer")
    for t in [first, *threads]:
        t.join(30)
    assert order == ["w1", "w2", "w3", "w4", "newcomer"]
    assert slots._free == 1 and not slots._waiters
