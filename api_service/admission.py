"""Admission control: at most N plain HTTP requests run at once in a worker process.

Under gevent a process accepts every connection and runs all their requests at once. When
they need the CPU together, each one's turn comes round slowly - including the request
that holds an account's row lock, which then holds it for longer, so every other purchase
of that account waits longer too (the hot-account case ran at half the rate of a sync
worker). With a small limit, a gevent process runs requests much as a sync worker would,
a few at a time, while it still holds thousands of idle websockets: the websocket routes
(long-lived, mostly idle), the probes and /metrics are not counted. The limit is
TXMON_HTTP_CONCURRENCY (0 turns it off); requests past it wait here, in arrival order, as
they would in a sync worker's accept queue. See docs/DECISIONS.md.
"""
from __future__ import annotations

import threading
from collections import deque


class FairSlots:
    """A counting semaphore that serves waiters strictly in arrival order.

    threading's (and gevent's) Semaphore let a newcomer take a slot that was just freed
    while the waiter woken for it is still waking up; under load some requests then wait
    over and over (measured: p50 38 ms but p90 850 ms). Here a freed slot is handed to the
    oldest waiter directly, so nobody can barge in ahead of it.
    """

    def __init__(self, limit: int):
        self._free = limit
        self._lock = threading.Lock()
        self._waiters: deque[threading.Event] = deque()

    def __enter__(self):
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return self
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # set by the release that hands its slot over
        return self

    def __exit__(self, *exc):
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._free += 1


class Admission:
    """WSGI middleware: a fair semaphore around every request outside ``exempt``.

    Exempt: the websocket routes (long-lived, mostly idle) and the probes and metrics,
    which must answer while requests queue (a liveness probe stuck behind them would get a
    busy but healthy process restarted).
    """

    def __init__(self, app, limit: int,
                 exempt: tuple[str, ...] = ("/ws/", "/healthz", "/readyz", "/metrics")):
        self.app = app
        self.exempt = exempt
        self.slots = FairSlots(limit)  # threading is gevent-patched there: cooperative

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO", "").startswith(self.exempt):
            return self.app(environ, start_response)
        with self.slots:
            body = self.app(environ, start_response)
            # Flask's JSON bodies are built already; a streamed body is produced here too,
            # so the slot covers all the work of the request.
            try:
                return [b"".join(body)]
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
