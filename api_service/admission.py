"""Admission control: bounded request bodies, then at most N requests at once per pool.

Under gevent a process accepts every connection and runs all their requests at once. When
they need the CPU together, each one's turn comes round slowly - including the request
that holds an account's row lock, which then holds it for longer, so every other purchase
of that account waits longer too (the hot-account case ran at half the rate of a sync
worker). With a small limit, a gevent process runs requests much as a sync worker would,
a few at a time, while it still holds thousands of idle websockets: the websocket routes
(long-lived, mostly idle), the probes and /metrics are not counted. The limit is
TXMON_HTTP_CONCURRENCY per pool (0: no slots); requests past it wait here, in arrival
order, at most SLOT_WAIT_S, then get 503 ``overloaded``.

A request's body is read whole (at most BODY_LIMIT bytes, within BODY_TIMEOUT_S) BEFORE a
slot is taken, so a client that uploads slowly holds a connection, never a slot. The main
app's calls (a valid X-API-Key) have a pool of their own: users cannot starve purchases.
See docs/DECISIONS.md.
"""
from __future__ import annotations

import hmac
import io
import sys
import threading
import time
from collections import deque
from contextlib import nullcontext

from api_service.errors import wsgi_error

BODY_LIMIT = 64 * 1024
BODY_TIMEOUT_S = 10.0
SLOT_WAIT_S = 5.0
# A plain HTTP connection that neither sends nor takes a byte for this long is dropped
# (gevent sockets otherwise block forever, e.g. on a client that stops reading a response).
SOCKET_TIMEOUT_S = 30.0
CLOSE_CONNECTION = "txmon.close_connection"  # read by gunicorn.conf.py's post_request


class FairSlots:
    """A counting semaphore that serves waiters strictly in arrival order.

    threading's (and gevent's) Semaphore let a newcomer take a slot that was just freed
    while the waiter woken for it is still waking up; under load some requests then wait
    over and over (measured: p50 38 ms but p90 850 ms). Here a freed slot is handed to the
    oldest waiter directly, so nobody can barge in ahead of it.
    """

    def __init__(self, limit: int):
        self._free = limit
        self._lock = threading.Lock()  # threading is gevent-patched there: cooperative
        self._waiters: deque[threading.Event] = deque()

    def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting at most ``timeout`` seconds; False if none came."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):  # set by the release that hands its slot over
            return True
        with self._lock:
            if turn.is_set():  # handed over just as the wait ended: ours
                return True
            self._waiters.remove(turn)
            return False

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._free += 1


class _NoSlots:
    """TXMON_HTTP_CONCURRENCY=0: nobody waits."""

    def acquire(self, timeout: float) -> bool:
        return True

    def release(self) -> None:
        pass


class _BodyTimeout(Exception):
    pass


def _deadline(seconds: float):
    """Under gevent, a deadline for the whole read; elsewhere each read is bounded by the
    socket timeout set before it."""
    if "gevent.monkey" in sys.modules:
        import gevent

        return gevent.Timeout(seconds, _BodyTimeout)
    return nullcontext()


def _socket_timeout(environ, seconds: float | None) -> None:
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        try:
            sock.settimeout(seconds)
        except OSError:
            pass


class Admission:
    """WSGI middleware: the body limit and deadline, then a fair slot per request.

    Not counted: the websocket routes (long-lived, mostly idle) and the probes and metrics,
    which must answer while requests queue (a liveness probe stuck behind them would get a
    busy but healthy process restarted).
    """

    def __init__(self, app, limit: int, *, service_keys=(), body_limit: int = BODY_LIMIT,
                 body_timeout: float = BODY_TIMEOUT_S, slot_wait: float = SLOT_WAIT_S,
                 exempt: tuple[str, ...] = ("/healthz", "/readyz", "/metrics")):
        self.app = app
        self.exempt = exempt
        self.service_keys = [k.encode() for k in service_keys]
        self.body_limit, self.body_timeout, self.slot_wait = body_limit, body_timeout, slot_wait
        self.users = FairSlots(limit) if limit > 0 else _NoSlots()
        self.service = FairSlots(limit) if limit > 0 else _NoSlots()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/ws/"):
            _socket_timeout(environ, None)  # an idle websocket is normal
            return self.app(environ, start_response)
        _socket_timeout(environ, SOCKET_TIMEOUT_S)
        refused = self._read_body(environ)
        if refused is not None:
            environ[CLOSE_CONNECTION] = True  # the rest of the body is never read
            return refused(environ, start_response)
        if path.startswith(self.exempt):
            return self.app(environ, start_response)
        pool = self.service if self._is_service(environ) else self.users
        if not pool.acquire(self.slot_wait):
            return wsgi_error(503, "overloaded", "No capacity right now; retry shortly.",
                              headers={"Retry-After": "1"})(environ, start_response)
        try:
            # A streamed body iterates after this returns, outside the slot: Flask has
            # built every other response by now.
            return self.app(environ, start_response)
        finally:
            pool.release()

    def _is_service(self, environ) -> bool:
        key = environ.get("HTTP_X_API_KEY")
        if not key:
            return False
        key = key.encode("latin-1", "replace")
        return any(hmac.compare_digest(key, k) for k in self.service_keys)

    def _read_body(self, environ):
        """Buffer the body (the app reads it from memory); an error response if it is over
        the limit or too slow."""
        length = environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        try:
            declared = int(length) if length else None
        except ValueError:
            return wsgi_error(400, "bad_request", "Content-Length is not a number.")
        if declared is not None and declared > self.body_limit:
            return self._too_large()
        if not declared and not chunked:
            return None
        stream, want = environ["wsgi.input"], self.body_limit + 1
        chunks, size = [], 0
        end = time.monotonic() + self.body_timeout
        try:
            with _deadline(self.body_timeout):
                while size < want:
                    left = end - time.monotonic()
                    if left <= 0:
                        raise _BodyTimeout
                    _socket_timeout(environ, left)
                    chunk = stream.read(min(16384, want - size))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
        except (_BodyTimeout, TimeoutError):
            return wsgi_error(408, "request_timeout",
                              f"The request body did not arrive within {self.body_timeout:g} s.")
        finally:
            _socket_timeout(environ, SOCKET_TIMEOUT_S)
        if size > self.body_limit:
            return self._too_large()
        body = b"".join(chunks)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return None

    def _too_large(self):
        return wsgi_error(413, "payload_too_large",
                          f"The request body is over {self.body_limit} bytes.",
                          {"limit_bytes": self.body_limit})
