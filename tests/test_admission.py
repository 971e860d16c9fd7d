"""api_service.admission: at most N plain HTTP requests at once per pool; websockets free;
a slot wait is bounded; a streamed body holds no slot; the main app has its own pool.

The middleware is tested around a WSGI app that records how many calls overlap, from many
threads (under gunicorn's gevent worker the same semaphore is cooperative; the websocket
tests run the whole stack that way with the default limit, and tests/test_hardening_http.py
runs the slow-upload attack against gunicorn).
"""
from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import Flask, Response

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


def _call(app, path: str, **environ) -> bytes:
    """Call ``app`` as a WSGI server does: iterate the body, then close it."""
    body = app({"PATH_INFO": path, "REQUEST_METHOD": "GET", **environ}, lambda *a: None)
    try:
        return b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()


class Held:
    """A WSGI app whose calls block until ``go`` is set (a generous deadline)."""

    def __init__(self):
        self.go = threading.Event()
        self.entered = threading.Semaphore(0)

    def __call__(self, environ, start_response):
        self.entered.release()
        assert self.go.wait(30)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"held"]


def _status_of(app, path: str, **environ) -> tuple[str, dict, bytes]:
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET", **environ},
                        start_response))
    return seen["status"], seen["headers"], body


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
    wsgi = create_app(config).wsgi_app
    assert isinstance(wsgi, Admission) and wsgi.users._free == wsgi.service._free == 3
    config["HTTP_CONCURRENCY"] = 0  # no slots; the body limit still holds
    wsgi = create_app(config).wsgi_app
    status, _, _ = _status_of(wsgi, "/api/v1/x", REQUEST_METHOD="POST",
                              CONTENT_LENGTH=str(64 * 1024 + 1), **{"wsgi.input": io.BytesIO()})
    assert status.startswith("413")


def test_a_slot_wait_past_its_bound__503_overloaded_with_retry_after():
    inner = Held()
    app = Admission(inner, 1, slot_wait=0.5)
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(_call, app, "/api/wallet/balance")
        assert inner.entered.acquire(timeout=30)
        status, headers, body = _status_of(app, "/api/wallet/balance")
        inner.go.set()
        assert holder.result(30) == b"held"
    assert status == "503 SERVICE UNAVAILABLE"
    assert int(headers["Retry-After"]) >= 1
    assert json.loads(body)["error"]["code"] == "overloaded"
    assert app.users._free == 1 and not app.users._waiters  # the timed-out waiter left


def test_the_main_apps_calls_never_wait_behind_user_requests():
    """Users fill their pool; a call with a valid X-API-Key runs at once. A wrong key is a
    user's request (it cannot jump the queue by sending any X-API-Key)."""
    inner = Held()
    app = Admission(inner, 1, service_keys=["the-key"], slot_wait=0.5)
    with ThreadPoolExecutor(2) as pool:
        user = pool.submit(_call, app, "/api/wallet/balance")
        assert inner.entered.acquire(timeout=30)
        status, _, _ = _status_of(app, "/api/v1/x", HTTP_X_API_KEY="not-the-key")
        assert status.startswith("503")
        service = pool.submit(_call, app, "/api/v1/verifications", HTTP_X_API_KEY="the-key")
        assert inner.entered.acquire(timeout=30)  # in, while the user's request holds its slot
        inner.go.set()
        assert service.result(30) == b"held" and user.result(30) == b"held"


def test_a_streamed_body_iterates_without_holding_a_slot():
    """A streamed response (the CSV export) produces its body after the view returned:
    other requests run meanwhile, with one slot in all."""
    flask_app = Flask(__name__)
    streaming, finish = threading.Event(), threading.Event()

    @flask_app.get("/stream")
    def stream():
        def generate():
            yield b"first,"
            streaming.set()
            assert finish.wait(30)
            yield b"last"
        return Response(generate(), mimetype="text/csv")

    @flask_app.get("/quick")
    def quick():
        return "quick"

    app = Admission(flask_app.wsgi_app, 1, slot_wait=30)
    base = {"SERVER_NAME": "t", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO()}
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(_call, app, "/stream", **base)
        assert streaming.wait(30)
        quick = pool.submit(_call, app, "/quick", **base)
        assert quick.result(30) == b"quick"  # while the stream is mid-body
        finish.set()
        assert streamed.result(30) == b"first,last"


def test_waiters_are_served_in_arrival_order_and_nobody_barges_in():
    """A freed slot goes to the oldest waiter, not to whoever asks at that moment."""
    from api_service.admission import FairSlots

    slots = FairSlots(1)
    order, holder_go = [], threading.Event()

    def holder():
        assert slots.acquire(30)
        holder_go.wait(30)
        slots.release()

    def waiter(name):
        assert slots.acquire(30)
        order.append(name)
        slots.release()

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
    assert slots.acquire(30)  # a newcomer right after the release: it queues behind w1..w4
    order.append("newcomer")
    slots.release()
    for t in [first, *threads]:
        t.join(30)
    assert order == ["w1", "w2", "w3", "w4", "newcomer"]
    assert slots._free == 1 and not slots._waiters
