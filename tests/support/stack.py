"""Real processes for the websocket tests: a private redis-server, gunicorn, a Celery worker.

``Stack`` serves the app the way production does (gunicorn with the gevent worker, a Celery
worker whose outbox relay publishes balance updates on Redis) against the test database and a
redis-server of its own (so it can be restarted, and so nobody else's worker takes our tasks).
``Client`` wraps websocket-client with bounded waits and close-code reporting. Every wait is
bounded and every process is killed (its whole process group) on teardown.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import jwt
import redis
import requests
import websocket

from tests.support.common import BIN, Process, RedisServer, app_env, free_port, wait_until

MARKER = "txmon-test-marker"  # key of Stack.rest's marker notifications
CELERY_QUEUES = ("default", "outbox", "push", "email", "refunds", "alerts",
                 "reconcile", "realtime")


class Stack:
    """gunicorn + Celery worker + private redis-server over the session's test database."""

    def __init__(self, app, database_url: str, tmpdir: Path, *, web_workers: int = 1,
                 env: dict | None = None):
        self.app, self.tmpdir = app, tmpdir
        self.web_workers = web_workers
        self.redis = RedisServer(tmpdir)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.access_log = tmpdir / "access.log"
        self.api_proc: Process | None = None
        self.worker_proc: Process | None = None
        self.env = app_env(app, database_url, self.redis.url(), tmpdir,
                           PORT=self.port, TXMON_BIND="127.0.0.1", TXMON_WORKER_CLASS="gevent",
                           TXMON_WEB_WORKERS=web_workers, TXMON_ACCESS_LOG=self.access_log,
                           TXMON_WORKER_METRICS_PORT=0, TXMON_DB_POOL_SIZE=5,
                           TXMON_PUBLIC_URL=self.base,
                           # bad-token tests would lock 127.0.0.1 out of the rest of a module
                           TXMON_RATELIMIT_AUTH_FAILURES="100000/minute")
        self.env.update(env or {})
        self._local = threading.local()
        self._sessions: list[requests.Session] = []  # every thread's, closed by stop()
        self.tokens: list[str] = []  # every token handed out, for the never-logged check

    # -- processes -------------------------------------------------------------------------

    def start(self) -> "Stack":
        self.redis.start()
        self.start_worker()
        self.start_api()
        self.wait_worker_ready()
        self.warm_hubs()
        return self

    def warm_hubs(self, timeout: float = 30) -> None:
        """Open sockets until every gunicorn worker's hub holds its Redis subscription.

        A hub subscribes when its process gets its first socket, asynchronously; tests start
        from the steady state (the cold start has its own test in test_ws_resilience.py).
        """
        opened = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                client = Client(f"{self.ws_base}/ws/balance?since_seq=0")
                opened.append(client)  # one user each: a user holds at most 5 sockets
                client.send_json({"type": "auth", "token": self.token(f"warm-up-{len(opened)}")})
                assert client.recv()["type"] == "snapshot"
                per = connections_by_worker(self, [])
                if len(per) == self.web_workers and all(
                        p["psubscriptions"] == 1 for p in per.values()):
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"hubs not all subscribed after {timeout}s: {per}")
        finally:
            for client in opened:
                client.close()

    def start_api(self) -> None:
        prom = self.tmpdir / "prom-api"
        prom.mkdir(exist_ok=True)
        env = dict(self.env, PROMETHEUS_MULTIPROC_DIR=str(prom))
        # --no-control-socket: gunicorn 27's default control socket is one path per machine,
        # and a test server must not take it from a gunicorn someone else runs here.
        self.api_proc = Process("gunicorn", [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py",
                                             "--no-control-socket", "api_service.wsgi:app"],
                                env, self.tmpdir)
        wait_until(self._api_ready, 30, interval=0.1, message="gunicorn /healthz")
        # Every worker must have booted (workers import the app after the master binds).
        wait_until(lambda: len(self.api_worker_pids()) == self.web_workers, 15,
                   message=f"{self.web_workers} gunicorn workers")

    def _api_ready(self) -> bool:
        if not self.api_proc.alive():
            raise AssertionError(f"gunicorn exited:\n{self.api_proc.tail()}")
        try:
            return requests.get(self.base + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def api_worker_pids(self) -> list[int]:
        """The pids of gunicorn's worker processes (children of the master)."""
        try:
            out = subprocess.run(["pgrep", "-P", str(self.api_proc.pid)], capture_output=True,
                                 text=True, timeout=5).stdout
        except subprocess.TimeoutExpired:
            return []
        return [int(p) for p in out.split()]

    def start_worker(self) -> None:
        prom = self.tmpdir / "prom-worker"
        prom.mkdir(exist_ok=True)
        env = dict(self.env, PROMETHEUS_MULTIPROC_DIR=str(prom))
        self.worker_proc = Process("celery", [
            str(BIN / "celery"), "-A", "worker_service.celery_app", "worker", "-c", "2",
            "--loglevel=INFO", "-n", f"wstest-{uuid.uuid4().hex[:8]}@%h", "--without-mingle",
            "--without-gossip"], env, self.tmpdir)

    def wait_worker_ready(self) -> None:
        def ready():
            if not self.worker_proc.alive():
                raise AssertionError(f"celery worker exited:\n{self.worker_proc.tail()}")
            out = self.worker_proc.output()
            return " ready." in out and "Outbox relay started" in out
        wait_until(ready, 45, interval=0.1, message="celery worker ready")

    def close_http(self) -> None:
        """Close the keep-alive HTTP connections of every thread's session: an idle one holds
        a gunicorn worker for its whole graceful_timeout when it stops."""
        for session in self._sessions:
            session.close()

    def stop(self) -> None:
        self.close_http()
        for proc in (self.api_proc, self.worker_proc, self.redis.proc):
            if proc is not None:
                proc.stop(grace=6)

    def logs(self) -> str:
        """gunicorn's stdout, stderr and access log, and the Celery worker's output."""
        parts = [self.api_proc.output() if self.api_proc else ""]
        if self.access_log.exists():
            parts.append(self.access_log.read_text(errors="replace"))
        return "\n".join(parts)

    # -- tokens ----------------------------------------------------------------------------

    def token(self, user_id: str, *, admin: bool = False, ttl=timedelta(hours=1),
              secret: str | None = None) -> str:
        """A JWT as the main app mints it (``secret`` to forge one)."""
        from api_service.auth import mint_token

        with self.app.app_context():
            token = mint_token(user_id, admin=admin, ttl=ttl, secret=secret)
        self.tokens.append(token)
        return token

    # -- HTTP (service key) ----------------------------------------------------------------

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            self._sessions.append(s)
            s.headers["X-API-Key"] = self.app.config["SERVICE_KEYS"][0]
        return s

    def call(self, method: str, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 15)
        return self._session().request(method, self.base + path, **kw)

    def account(self, user_id: str, balance_cents: int = 0) -> None:
        """Create the account and credit ``balance_cents`` (one transaction, seq 1)."""
        r = self.call("PUT", f"/api/v1/accounts/{user_id}", json={})
        assert r.status_code in (200, 201), r.text
        if balance_cents:
            self.credit(user_id, balance_cents)

    def credit(self, user_id: str, amount_cents: int) -> dict:
        r = self.call("POST", f"/api/v1/accounts/{user_id}/credits",
                      json={"amount_cents": amount_cents, "payment_id": uuid.uuid4().hex})
        assert r.status_code == 201, r.text
        return r.json()

    def purchase(self, user_id: str, cost_cents: int = 100) -> dict:
        """Charge a verification; returns the response body (transaction, balance)."""
        r = self.call("POST", "/api/v1/verifications",
                      json={"user_id": user_id, "service_name": "WhatsApp", "country": "US",
                            "cost_cents": cost_cents})
        assert r.status_code == 201, r.text
        return r.json()

    def balance(self, user_id: str) -> dict:
        r = self.call("GET", f"/api/v1/accounts/{user_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def set_preferences(self, user_id: str, **prefs) -> None:
        r = self.call("PUT", "/api/notifications/preferences", json=prefs,
                      headers={"Authorization": f"Bearer {self.token(user_id)}",
                               "X-API-Key": None})
        assert r.status_code == 200, r.text

    def metric(self, name: str) -> float:
        """Sum of every sample of ``name`` on the API's /metrics."""
        r = requests.get(self.base + "/metrics", timeout=10)
        assert r.status_code == 200, r.text
        total = 0.0
        for line in r.text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    # -- quiescence ------------------------------------------------------------------------

    def quiesce(self, timeout: float = 20) -> None:
        """Wait until every due outbox row is dispatched and the worker has run its tasks.

        The suite empties the tables and restarts their ids between tests, so a task left
        over from one test must not run against the next test's rows with the same ids.
        """
        from sqlalchemy import text

        from shared.db import db

        r = self.redis.client()

        def idle():
            with self.app.app_context(), db.engine.connect() as conn:
                pending = conn.execute(text(
                    "SELECT count(*) FROM outbox WHERE dispatched_at IS NULL "
                    "AND available_at <= now() + interval '1 second'")).scalar_one()
            if pending:
                return False
            try:
                if any(r.llen(q) for q in CELERY_QUEUES):
                    return False
                for raw in r.hvals("unacked"):
                    headers = json.loads(raw)[0].get("headers", {})
                    if not headers.get("eta"):  # ETA refunds wait minutes: not our concern
                        return False
            except redis.RedisError:
                return False
            return True

        try:
            wait_until(idle, timeout, interval=0.1, message="outbox and Celery queues to drain")
        finally:
            r.close()


    def rest(self, client: "Client", user_id: str | None = None) -> list[dict]:
        """Every message still on its way to ``client`` (a user's socket, or the admin feed
        when ``user_id`` is None), with no quiet window: once the system is idle (outbox
        dispatched, no task queued or unacknowledged), a marker published now on the
        client's channel reaches it after everything published before it, since Redis and
        the hub keep each channel's order. Clients never return markers (``Client.recv``)."""
        from shared.realtime import ADMIN_CHANNEL, user_channel

        self.quiesce()
        marker = uuid.uuid4().hex
        r = self.redis.client()
        try:
            r.publish(user_channel(user_id) if user_id else ADMIN_CHANNEL,
                      json.dumps({"type": "notification", "notification": {MARKER: marker}}))
        finally:
            r.close()
        got: list[dict] = []
        deadline = time.monotonic() + 30
        while marker not in client.markers:
            assert time.monotonic() < deadline, (
                f"marker not relayed within 30 s; got {summarize(got)}")
            try:
                got.append(client.recv(1))
            except TimeoutError:
                continue
        return got


@contextmanager
def running_stack(app, database_url, tmp_path_factory, name: str, **kw):
    """A started Stack, always stopped afterwards (even when start-up fails half-way)."""
    stack = Stack(app, database_url, tmp_path_factory.mktemp(name), **kw)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


# -- websocket client ----------------------------------------------------------------------


class Closed(Exception):
    """The server closed the socket; ``code`` is the close status (None: dropped, no frame)."""

    def __init__(self, code: int | None, reason: str = ""):
        super().__init__(f"closed code={code} reason={reason!r}")
        self.code, self.reason = code, reason


class Client:
    """A websocket-client connection with bounded reads and decoded JSON messages."""

    def __init__(self, url: str, *, rcvbuf: int | None = None, timeout: float = 10):
        sockopt = [(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)] if rcvbuf else None
        self.url = url
        self.ws = websocket.create_connection(url, timeout=timeout, sockopt=sockopt)
        self.closed: Closed | None = None
        self.markers: set[str] = set()  # Stack.rest's markers seen (never returned)

    def send(self, text: str) -> None:
        self.ws.send(text)

    def send_json(self, message: dict) -> None:
        self.ws.send(json.dumps(message))

    def recv_raw(self, timeout: float = 10) -> str:
        """The next text message; Closed when the server closes; TimeoutError when silent."""
        if self.closed is not None:
            raise self.closed
        self.ws.settimeout(timeout)
        try:
            opcode, data = self.ws.recv_data()
        except websocket.WebSocketTimeoutException:
            raise TimeoutError(f"no message within {timeout}s") from None
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError) as exc:
            self.closed = Closed(None, f"connection dropped ({type(exc).__name__}: {exc})")
            raise self.closed from None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            payload = data.data if hasattr(data, "data") else data
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            self.closed = Closed(code, payload[2:].decode(errors="replace"))
            raise self.closed
        return data.decode() if isinstance(data, bytes) else data

    def recv(self, timeout: float = 10) -> dict:
        """The next message, decoded as JSON (Stack.rest's markers are noted and skipped)."""
        while True:
            message = json.loads(self.recv_raw(timeout))
            marker = (message.get("notification") or {}).get(MARKER)
            if marker is None:
                return message
            self.markers.add(marker)

    def expect_close(self, timeout: float = 10) -> Closed:
        """Read until the server closes; returns the Closed (fails if it does not)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"socket still open after {timeout}s")
            try:
                self.recv_raw(left)
            except Closed as closed:
                return closed
            except TimeoutError:
                continue

    def collect(self, until, timeout: float = 20) -> list[dict]:
        """Messages until ``until(messages)`` is true; AssertionError after ``timeout``."""
        got: list[dict] = []
        deadline = time.monotonic() + timeout
        while not until(got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s; got {len(got)} messages: "
                                     f"{summarize(got)}")
            try:
                got.append(self.recv(min(left, 5)))
            except TimeoutError:
                continue
        return got

    def drain(self, quiet: float = 0.5, limit: float = 10) -> list[dict]:
        """Every message that arrives until the socket is silent for ``quiet`` seconds."""
        got: list[dict] = []
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                got.append(self.recv(quiet))
            except TimeoutError:
                break
        return got

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except Exception:  # already gone
            pass


def summarize(messages: list[dict]) -> list:
    """A short view of messages for assertion output."""
    out = []
    for m in messages[-40:]:
        if m.get("type") in ("balance_update", "snapshot"):
            out.append((m["type"], m.get("seq")))
        else:
            out.append(m.get("type"))
    return out


def updates(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m.get("type") == "balance_update"]


def seqs(messages: list[dict]) -> list[int]:
    return [m["seq"] for m in updates(messages)]


def has_seq(seq: int):
    """``collect`` predicate: a balance_update with ``seq`` arrived."""
    return lambda got: any(m.get("type") == "balance_update" and m["seq"] >= seq for m in got)


def forge(user_id: str, secret: str | None = "not-the-secret-0123456789abcdef0123", *,
          algorithm: str = "HS256", role: str = "user") -> str:
    """A well-formed, unexpired token signed with the wrong secret (or algorithm)."""
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    with warnings.catch_warnings():  # PyJWT warns about short HS512 keys; that is the point
        warnings.simplefilter("ignore")
        return jwt.encode({"sub": user_id, "role": role, "iat": now,
                           "exp": now + timedelta(hours=1)}, secret, algorithm=algorithm)


class Sockets:
    """Opens websocket clients on a stack; close_all() (fixture teardown) closes every one."""

    def __init__(self, stack: Stack):
        self.stack, self.opened = stack, []

    def url(self, path: str, *, token: str | None = None, since: int | str | None = None) -> str:
        from urllib.parse import urlencode

        query = {}
        if token is not None:
            query["token"] = token
        if since is not None:
            query["since_seq"] = since
        return self.stack.ws_base + path + ("?" + urlencode(query) if query else "")

    def balance(self, token: str | None = None, since: int | str | None = None,
                **kw) -> Client:
        """A /ws/balance client (auth by ?token= when ``token`` is given)."""
        return self._open(self.url("/ws/balance", token=token, since=since), **kw)

    def admin(self, token: str | None = None, **kw) -> Client:
        return self._open(self.url("/ws/admin", token=token), **kw)

    def _open(self, url: str, **kw) -> Client:
        client = Client(url, **kw)
        self.opened.append(client)
        return client

    def close_all(self) -> None:
        for client in self.opened:
            client.close()


class Reader(threading.Thread):
    """Reads a client in the background until ``until(messages)``, a close, or ``timeout``.

    ``messages`` holds (monotonic arrival time, message); ``closed`` the Closed, if any.
    """

    def __init__(self, client: Client, until, timeout: float = 60):
        super().__init__(daemon=True)
        self.client, self.until, self.timeout = client, until, timeout
        self.messages: list[tuple[float, dict]] = []
        self.closed: Closed | None = None
        self.error: BaseException | None = None
        self.start()

    @property
    def received(self) -> list[dict]:
        return [m for _, m in self.messages]

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while not self.until(self.received) and time.monotonic() < deadline:
                try:
                    message = self.client.recv(min(1.0, max(0.01, deadline - time.monotonic())))
                except TimeoutError:
                    continue
                self.messages.append((time.monotonic(), message))
        except Closed as closed:
            self.closed = closed
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self, timeout: float | None = None) -> list[dict]:
        """Join (bounded) and return the messages; re-raises a reader error."""
        self.join(self.timeout + 5 if timeout is None else timeout)
        assert not self.is_alive(), "reader thread did not finish"
        if self.error is not None:
            raise self.error
        return self.received


def check_update(message: dict, user_id: str) -> None:
    """A balance_update has DESIGN.md's shape and belongs to ``user_id``."""
    assert set(message) == {"type", "balance_cents", "seq", "transaction", "timestamp"}, message
    tx = message["transaction"]
    assert tx["user_id"] == user_id, message
    assert tx["seq"] == message["seq"], message
    assert tx["balance_after_cents"] == message["balance_cents"], message


def check_contiguous(messages: list[dict], first: int, last: int) -> None:
    """The balance_updates are exactly seq first..last, once each, in order, and add up."""
    got = seqs(messages)
    assert got == list(range(first, last + 1)), (
        f"expected seq {first}..{last} once each in order; got {compress(got)}")
    ups = updates(messages)
    for before, after in zip(ups, ups[1:]):
        assert after["balance_cents"] == (before["balance_cents"]
                                          + after["transaction"]["amount_cents"]), (before, after)


def compress(values: list[int]) -> str:
    """[1, 2, 3, 5, 5, 6] -> '1-3, 5, 5-6' (readable failure messages for long seq lists)."""
    out, start, prev = [], None, None
    for v in values:
        if start is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


# -- who holds which TCP connection (Linux /proc) ------------------------------------------


def _tcp_table() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state hex, inode) of every TCP socket on this host."""
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            rows.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16),
                         f[3], int(f[9])))
    return rows


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


ESTABLISHED = "01"


def connections_by_worker(stack: Stack, clients: list[Client]) -> dict[int, dict[str, int]]:
    """Per gunicorn worker pid: how many of ``clients`` it serves ("sockets") and how many
    of its Redis connections hold a pattern subscription ("psubscriptions")."""
    client_ports = {c.ws.sock.getsockname()[1] for c in clients}
    r = stack.redis.client()
    try:
        psub_ports = {int(c["addr"].rsplit(":", 1)[1]) for c in r.client_list()
                      if int(c.get("psub", 0)) > 0}
    finally:
        r.close()
    table = _tcp_table()
    out = {}
    for pid in stack.api_worker_pids():
        mine = _socket_inodes(pid)
        out[pid] = {
            "sockets": sum(1 for lp, rp, st, ino in table if ino in mine and lp == stack.port
                           and rp in client_ports and st == ESTABLISHED),
            "psubscriptions": sum(1 for lp, rp, st, ino in table
                                  if ino in mine and rp == stack.redis.port and lp in psub_ports),
        }
    return out


def uid(prefix: str = "ws") -> str:
    """A fresh user id for one test."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def notifications(messages: list[dict]) -> list[dict]:
    """The notification objects among websocket messages."""
    return [m["notification"] for m in messages if m.get("type") == "notification"]
