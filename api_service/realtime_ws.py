"""Websockets: /ws/balance (a user's live balance) and /ws/admin (every transaction, alert).

Protocol (DESIGN.md "Realtime"): authenticate with ?token= or a first
``{"type": "auth", "token": ...}`` within 5 s (else close 1008); then a ``snapshot``, the
replay of every transaction with seq > since_seq from the database, then live messages in
seq order without gaps or duplicates. The socket registers with the hub BEFORE reading the
snapshot, so an update committed during the replay is either in the replay or queued live;
``UserStream`` drops what it already sent and fills any gap from the database.
"""
from __future__ import annotations

import functools
import json
import logging
import queue
import re
import socket
import threading
import time
import uuid

import redis
from flask import current_app, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from sqlalchemy import select

from api_service.auth import Principal, count_failure, decode_token, refuse_blocked_address
from api_service.hub import Subscriber, hub_for
from shared.db import db
from shared.errors import RateLimited, Unauthorized
from shared.ledger import serialize_transaction
from shared.metrics import WS_CLOSED_SLOW, WS_OPEN
from shared.models import Account, Transaction
from shared.realtime import balance_update

sock = Sock()
log = logging.getLogger("txmon.ws")
AUTH_TIMEOUT_S = 5
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
LIVENESS_CHECK_S = 30
REPLAY_PAGE = 500  # transactions per replay query
SINCE_SEQ = re.compile(r"[0-9]{1,18}")  # DESIGN.md Realtime: 1-18 digits
MAX_MESSAGE_BYTES = 4096  # a larger client message closes the socket with 1009 (the library)
LEASE_S = 3 * LIVENESS_CHECK_S  # a socket's slot outlives a crashed process by this at most


class SocketLeases:
    """At most ``limit`` sockets per caller across every API process.

    Each socket holds a lease in the Redis sorted set ``txmon:ws:leases:<kind>:<id>``
    (member: the socket's id, score: when the lease ends), renewed while it lives and removed
    when it closes; a process that dies leaves leases that lapse within LEASE_S. With Redis
    unreachable the cap counts this process's sockets only: the limit must not need Redis up.
    """

    _ACQUIRE = """
    local now = tonumber(redis.call('TIME')[1])
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
    if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
    return 1
    """

    def __init__(self, redis_url: str):
        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=1,
                                           socket_timeout=1)
        self.acquire_script = self.client.register_script(self._ACQUIRE)
        self.local: dict[str, int] = {}  # this process's sockets per key
        self.lock = threading.Lock()

    def acquire(self, key: str, lease: str, limit: int) -> bool:
        with self.lock:
            local = self.local.get(key, 0)
            if local >= limit:
                return False
            self.local[key] = local + 1
        try:
            ok = bool(self.acquire_script(keys=[f"txmon:ws:leases:{key}"],
                                          args=[lease, limit, LEASE_S]))
        except redis.RedisError:
            log.warning("Socket leases unreachable; capping sockets per process")
            ok = True
        if not ok:
            self._forget(key)
        return ok

    def renew(self, key: str, lease: str) -> None:
        try:
            now = self.client.time()[0]
            pipe = self.client.pipeline()
            pipe.zadd(f"txmon:ws:leases:{key}", {lease: now + LEASE_S}, xx=True)
            pipe.expire(f"txmon:ws:leases:{key}", LEASE_S)
            pipe.execute()
        except redis.RedisError:
            pass  # the next renewal tries again

    def release(self, key: str, lease: str) -> None:
        self._forget(key)
        try:
            self.client.zrem(f"txmon:ws:leases:{key}", lease)
        except redis.RedisError:
            pass  # lapses within LEASE_S

    def _forget(self, key: str) -> None:
        with self.lock:
            left = self.local.get(key, 1) - 1
            if left > 0:
                self.local[key] = left
            else:
                self.local.pop(key, None)


@functools.lru_cache(maxsize=4)
def leases_for(redis_url: str) -> SocketLeases:
    """The process's socket leases for ``redis_url``."""
    return SocketLeases(redis_url)


def _authenticate(ws, role: str) -> Principal | None:
    """The caller from ?token= or a first auth message; closes with 1008 and returns None.
    A bad token counts against the address like a failed HTTP authentication does."""
    try:
        refuse_blocked_address()
    except RateLimited as exc:
        _close(ws, POLICY_VIOLATION, exc.message)
        return None
    token = request.args.get("token")
    if token is None:
        try:
            first = ws.receive(timeout=AUTH_TIMEOUT_S)
            data = json.loads(first) if first else None
            if isinstance(data, dict) and data.get("type") == "auth":
                token = data.get("token")
        except (ValueError, ConnectionClosed):
            token = None
    try:
        if not isinstance(token, str) or not token:
            raise Unauthorized("authentication required")
        principal = decode_token(token)
        if role == "admin" and principal.kind != "admin":
            raise Unauthorized("admin token required")
        return principal
    except Unauthorized as exc:
        if isinstance(token, str) and token:
            count_failure()
        _close(ws, POLICY_VIOLATION, exc.message)
        return None


def _close(ws, code: int, message: str) -> None:
    try:
        ws.close(reason=code, message=message)
    except Exception:  # already gone
        pass


def _force_close_later(ws, grace_s: float = 2.0):
    """on_slow callback: if the handler has not closed the socket within ``grace_s`` (its
    send is stuck on a full TCP buffer), shut the TCP connection so the handler unblocks."""

    def shut():
        try:
            ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def arm():
        timer = threading.Timer(grace_s, shut)
        timer.daemon = True
        timer.start()

    return arm


class _SendAll:
    """The connection socket with ``send`` doing ``sendall``, and a lingering ``close``.

    simple-websocket writes each frame with one ``sock.send``; under gevent (and in
    principle anywhere) that may write part of a frame, and the next frame would follow the
    cut one. Every frame must go out whole, and one frame at a time.
    """

    LINGER_S = 1.0
    LINGER_BYTES = 1 << 20

    def __init__(self, sock):
        self._sock = sock
        self._lock = threading.Lock()  # the library's own thread answers pings too

    def send(self, data) -> int:
        with self._lock:
            self._sock.sendall(data)
        return len(data)

    def close(self) -> None:
        """Closing with the client's bytes unread (a message over the limit) makes the kernel
        send a reset, which can discard our close frame (1009) before the client reads it:
        half-close, read and drop what is in flight for a moment, then close."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.LINGER_S
            drained = 0
            while drained < self.LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._sock.settimeout(left)
                chunk = self._sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass
        finally:
            self._sock.close()

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _wrap_connection() -> None:
    """The connection socket becomes a _SendAll before the library takes it: its reader
    thread starts inside the constructor, and on a message already over the limit it
    closes the socket before the handler could run."""
    for key in ("gunicorn.socket", "werkzeug.socket"):
        raw = request.environ.get(key)
        if raw is not None and not isinstance(raw, _SendAll):
            request.environ[key] = _SendAll(raw)


def _socket_route(handler):
    """A websocket handler whose close lingers to the end: the library's reader thread does
    the lingering close (_SendAll.close); when the handler returns, the server closes the
    raw connection at once, which resets it (and can drop the close frame) if that thread
    is still draining. So the handler waits for it, for as long as a lingering close takes.
    """
    @functools.wraps(handler)
    def run(ws):
        try:
            handler(ws)
        finally:
            if ws.connected:
                try:
                    ws.close()
                except (ConnectionClosed, OSError):
                    pass
            ws.thread.join(timeout=_SendAll.LINGER_S + 1)
    return run


class _InputSignal:
    """Stands in for the websocket's ``event``, which simple-websocket's own reader thread
    sets when a message arrives or the connection ends: it also wakes the socket's pump.

    The pump then waits on one queue for everything (hub messages, client input, closing),
    so a socket costs no reader thread (a greenlet and its stack under gevent) of ours.
    One wake-up stays queued at a time however fast the client sends. After the swap the
    handler reads only with ``receive(timeout=0)``, whose ``wait`` just asks whether
    anything is there, so this needs no lock or condition of its own (less memory per
    socket than a threading.Event).
    """

    __slots__ = ("_sub", "_flag", "pending")

    def __init__(self, sub: Subscriber):
        self._sub, self._flag, self.pending = sub, False, False

    def set(self) -> None:
        self._flag = True
        if not self.pending:
            self.pending = True
            self._sub.wake(("input", None))

    def clear(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout=None) -> bool:  # never blocks: see the class docstring
        return self._flag


def _answer_input(ws, signal: _InputSignal) -> bool:
    """Answer every text ping received so far; False once the client has gone."""
    signal.pending = False
    while True:
        data = ws.receive(timeout=0)  # raises ConnectionClosed once closed and drained
        if data is None:
            return ws.connected
        if data == "ping":
            ws.send("pong")


class UserStream:
    """What one user's socket has been sent, so every seq goes out once and in order."""

    def __init__(self, ws, user_id: str, hub):
        self.ws, self.user_id, self.hub = ws, user_id, hub
        self.last_seq: int | None = None
        self.synced_under = -1  # the hub subscription the last snapshot was taken under

    def send(self, message: dict) -> None:
        self.ws.send(json.dumps(message))

    def resync(self, subscription: int) -> None:
        """After the hub (re)subscribed: a fresh snapshot unless ours is already newer."""
        if subscription > self.synced_under:
            self.sync(self.last_seq)

    def sync(self, since_seq: int | None) -> None:
        """Send a snapshot, then every transaction after ``since_seq`` up to it."""
        # Read the generation first: a subscription made after this point resyncs us again.
        self.synced_under = self.hub.subscriptions if self.hub.connected.is_set() else -1
        with db.engine.connect() as conn:  # read, release, then send: a slow client
            row = conn.execute(select(Account.balance_cents, Account.last_seq)  # must not
                               .where(Account.user_id == self.user_id)).first()  # hold it
            balance, seq = (row.balance_cents, row.last_seq) if row else (0, 0)
        self.send({"type": "snapshot", "balance_cents": balance, "seq": seq})
        if since_seq is not None and since_seq < seq:
            self._replay(since_seq, seq)
        self.last_seq = seq

    def _replay(self, after: int, upto: int) -> None:
        """seq after..upto in keyset pages: a long history is never in memory at once, and no
        connection is held while a page is being sent."""
        while after < upto:
            with db.engine.connect() as conn:
                rows = self._rows(conn, after, min(upto, after + REPLAY_PAGE))
            self._send_rows(rows)
            after = min(upto, after + REPLAY_PAGE)

    def _rows(self, conn, after: int, upto: int) -> list:
        return conn.execute(select(Transaction.__table__).where(
            Transaction.user_id == self.user_id, Transaction.seq > after,
            Transaction.seq <= upto).order_by(Transaction.seq)).all()

    def _send_rows(self, rows) -> None:
        for tx in rows:
            data = serialize_transaction(tx)
            self.send(balance_update(data, data["created_at"]))

    def deliver(self, message: dict) -> None:
        """Send a live message; balance updates strictly in seq order, gaps filled from SQL."""
        if message.get("type") != "balance_update":
            self.send(message)
            return
        seq = message["seq"]
        if seq <= self.last_seq:
            return  # already sent (replay, or gap fill)
        if seq > self.last_seq + 1:
            self._replay(self.last_seq, seq - 1)
        self.send(message)
        self.last_seq = seq


def _pump(ws, sub: Subscriber, on_message, on_resync, *, expires_at: float | None,
          renew) -> None:
    """Drain the subscriber's queue to the socket until it closes, falls behind or its token
    expires; ``renew`` (the socket's lease) runs every LIVENESS_CHECK_S."""
    signal = ws.event = _InputSignal(sub)
    signal.set()  # whatever arrived before the swap
    next_renew = time.monotonic() + LIVENESS_CHECK_S
    while True:
        wait = max(0.0, next_renew - time.monotonic())
        if expires_at is not None:
            left = expires_at - time.time()
            if left <= 0:
                _close(ws, POLICY_VIOLATION, "token expired")
                return
            wait = min(wait, left)
        try:
            kind, payload = sub.queue.get(timeout=wait)
        except queue.Empty:  # a safety net: the library ends a connection between wake-ups
            if not ws.connected:
                return
            kind = None
        if time.monotonic() >= next_renew:
            renew()
            next_renew = time.monotonic() + LIVENESS_CHECK_S
        if kind is None:
            continue
        if sub.slow:
            _close(ws, TRY_AGAIN_LATER, "too slow; reconnect with since_seq")
            return
        if kind == "input":
            if not _answer_input(ws, signal):
                return
        elif kind == "going_away":
            _close(ws, GOING_AWAY, "server restarting; reconnect with since_seq")
            return
        elif kind == "resync":
            on_resync(payload)
        else:
            on_message(payload)


def _parse_since(ws) -> tuple[bool, int | None]:
    raw = request.args.get("since_seq")
    if raw is None:
        return True, None
    if not SINCE_SEQ.fullmatch(raw):  # isdigit() and int() also take '²' and '١٢'
        _close(ws, POLICY_VIOLATION, "since_seq must be 1-18 digits")
        return False, None
    return True, int(raw)


@sock.route("/ws/balance")
@_socket_route
def balance_socket(ws):
    """A user's live balance (see module docstring)."""
    ok, since = _parse_since(ws)
    principal = _authenticate(ws, "user") if ok else None
    if principal is None:
        return

    def stream(sub, hub, renew):
        user_stream = UserStream(ws, principal.user_id, hub)
        user_stream.sync(since)
        _pump(ws, sub, user_stream.deliver, user_stream.resync,
              expires_at=principal.expires_at, renew=renew)

    _serve(ws, principal, Subscriber(user_id=principal.user_id, maxsize=_queue_size(),
                                     on_slow=_force_close_later(ws)), stream)


@sock.route("/ws/admin")
@_socket_route
def admin_socket(ws):
    """Every transaction and alert, for admins."""
    principal = _authenticate(ws, "admin")
    if principal is None:
        return

    def stream(sub, _hub, renew):
        ws.send(json.dumps({"type": "hello", "role": "admin"}))
        _pump(ws, sub, lambda m: ws.send(json.dumps(m)),
              lambda _gen: ws.send(json.dumps({"type": "resync"})),
              expires_at=principal.expires_at, renew=renew)

    _serve(ws, principal, Subscriber(user_id=None, admin=True, maxsize=_queue_size(),
                                     on_slow=_force_close_later(ws)), stream)


sock.bp.before_request(_wrap_connection)  # the blueprint of the two routes above


def _queue_size() -> int:
    return current_app.config["WS_QUEUE_SIZE"]


def _serve(ws, principal: Principal, sub: Subscriber, stream) -> None:
    """Take one of the caller's socket leases, register with the hub, run ``stream``."""
    cfg = current_app.config
    leases = leases_for(cfg["REDIS_URL"])
    key, lease = f"{principal.kind}:{principal.user_id}", uuid.uuid4().hex
    if not leases.acquire(key, lease, cfg["WS_MAX_PER_USER"]):
        _close(ws, POLICY_VIOLATION, f"at most {cfg['WS_MAX_PER_USER']} sockets per user")
        return
    hub = hub_for(cfg["REDIS_URL"])
    hub.add(sub)
    WS_OPEN.inc()
    try:
        stream(sub, hub, lambda: leases.renew(key, lease))
    except (ConnectionClosed, OSError):
        pass
    finally:
        hub.remove(sub)
        WS_OPEN.dec()
        if sub.slow:
            WS_CLOSED_SLOW.inc()
        leases.release(key, lease)
