"""Realtime benchmark: purchase -> balance_update latency and idle websockets per API host.

One run (``scripts/bench_ws``, about 3-4 minutes, hard limit ``--budget`` seconds, 360):

1. creates a fresh database (``txmon_bench_ws``), migrates it (``flask db upgrade``) and seeds
   the latency accounts (3000001..) and the idle-socket accounts (3100001..), each with a big
   balance written as a seed credit; starts a private redis-server on a free port (pub/sub
   channels are global to a Redis server, whatever the DB number, and other people's
   workers use the shared one), gunicorn exactly as gunicorn.conf.py serves it with
   TXMON_WORKER_CLASS=gevent (default worker count) and one Celery worker (``-c 2``, its
   outbox relay publishes the balance updates);
2. reference: raw Redis PUBLISH -> SUBSCRIBE receive on loopback at the same rate, alone;
3. latency: one /ws/balance socket per latency account; purchases (POST
   /api/v1/verifications, cost 1 cent) paced open-loop at ``--rate`` (200/s) for a warm-up and
   ``--duration`` seconds; for each purchase the time the request was sent, the time its
   response arrived, the time its transaction was published on Redis (a raw pattern
   subscriber "taps" txmon:rt:user:*) and the time its balance_update arrived on the socket
   (matched on user id + seq); the Redis reference runs again during the load;
4. idle sockets: gunicorn served afresh, hubs warmed up, then up to ``--idle-target`` idle
   authenticated sockets opened by ``--idle-clients`` processes; RSS/PSS of the gunicorn tree
   before and after, sockets held (client and server side), then a purchase for a sample of
   held sockets' users must reach them. Repeated with gevent's worker_connections raised
   when the defaults hold fewer than the target, and once with gthread (``--no-gthread``
   skips it) for comparison;
5. writes the numbers into docs/PERFORMANCE.md between ``<!-- bench:ws -->`` and
   ``<!-- /bench:ws -->`` (nothing else in the file is touched), stops everything it started
   and drops the database.

Load clients are asyncio processes of this same file (``--role``) with a minimal websocket and
HTTP/1.1 client (no extra dependencies); all timestamps are CLOCK_MONOTONIC, which is
shared by every process on the machine. CPU time is sampled from /proc per phase, split into
the benchmark's own processes and *other* processes (the machine may be shared).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import math
import os
import platform
import queue
import random
import resource
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

from benchlib import BACKEND, CLK_TCK, admin_url, busy_ticks, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "PERFORMANCE.md"
BIN = ROOT / ".venv" / "bin"
HEADING = "## Realtime: /ws/balance latency and idle sockets"
MARK_BEGIN, MARK_END = "<!-- bench:ws -->", "<!-- /bench:ws -->"
DBNAME = "txmon_bench_ws"
LAT_USER0, IDLE_USER0 = 3000001, 3100001
SEED_BALANCE = 10**12
TARGET_P99_MS, TARGET_SOCKETS, TARGET_KB = 50.0, 5000, 50.0
REF_CHANNEL = "bench:ws:ref"
TAP_PATTERN = "txmon:rt:user:*"


def log(msg: str) -> None:
    print(f"[bench_ws {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values, p: float):
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def stats_ms(values_s) -> dict:
    vals = [v * 1000 for v in values_s]
    return {"n": len(vals), "p50": pct(vals, 50), "p95": pct(vals, 95), "p99": pct(vals, 99),
            "max": max(vals) if vals else None, "min": min(vals) if vals else None}


# =========================================================================================
# Client side (runs in --role child processes): minimal asyncio websocket, HTTP and RESP
# =========================================================================================

class WSClosed(Exception):
    pass


async def ws_connect(host: str, port: int, path: str, timeout: float):
    """TCP connect + RFC 6455 upgrade; returns (reader, writer)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError("upgrade refused: " + head.split(b"\r\n", 1)[0].decode())
        return reader, writer
    except BaseException:
        writer.close()
        raise


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


async def ws_message(reader, writer) -> str:
    """The next text message (answers pings); WSClosed on close or EOF."""
    parts: list[bytes] = []
    try:
        while True:
            b0, b1 = await reader.readexactly(2)
            if (b0, b1) == (0x48, 0x54):  # "HT": the server wrote an HTTP response after 101
                line = (await reader.readline()).decode(errors="replace").strip()
                raise WSClosed("HTTP response after the 101: HT" + line)
            op, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await reader.readexactly(8))[0]
            mask = await reader.readexactly(4) if b1 & 0x80 else None
            data = await reader.readexactly(n) if n else b""
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            if op == 0x8:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                raise WSClosed(f"close {code}")
            if op == 0x9:
                writer.write(ws_frame(0xA, data))
                continue
            if op == 0xA:
                continue
            parts.append(data)
            if b0 & 0x80:
                return b"".join(parts).decode()
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
        raise WSClosed(type(exc).__name__) from None


def resp_cmd(*args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


async def resp_read(reader):
    line = await reader.readline()
    if not line:
        raise ConnectionError("redis closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [await resp_read(reader) for _ in range(n)]
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else (await reader.readexactly(n + 2))[:-2]
    if kind == b":":
        return int(rest)
    if kind == b"+":
        return rest
    raise RuntimeError(f"redis error: {rest!r}")


class HttpPool:
    """Keep-alive HTTP/1.1 connections; a request takes an idle one or opens a new one."""

    def __init__(self, host: str, port: int, max_conns: int):
        self.host, self.port, self.max = host, port, max_conns
        self.idle: asyncio.Queue = asyncio.Queue()
        self.total = 0
        self.opened = 0

    async def acquire(self):
        while True:
            with contextlib.suppress(asyncio.QueueEmpty):
                return self.idle.get_nowait()
            if self.total < self.max:
                self.total += 1
                self.opened += 1
                try:
                    r, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                  10)
                    w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                          socket.TCP_NODELAY, 1)
                    return r, w
                except BaseException:
                    self.total -= 1
                    raise
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                return await asyncio.wait_for(self.idle.get(), 0.5)

    def release(self, conn, reusable: bool) -> None:
        if reusable:
            self.idle.put_nowait(conn)
        else:
            self.total -= 1
            conn[1].close()

    @staticmethod
    async def exchange(conn, raw: bytes, timeout: float):
        """Send one request; (status, body bytes, keep-alive?, time the request was sent)."""
        r, w = conn
        t_sent = time.monotonic()
        w.write(raw)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await asyncio.wait_for(r.readexactly(int(headers["content-length"])), timeout)
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await r.readline()).strip().split(b";")[0], 16)
                chunk = await r.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            body = b"".join(chunks)
        else:
            body = await asyncio.wait_for(r.read(), timeout)
            return status, body, False, t_sent
        return status, body, headers.get("connection", "").lower() != "close", t_sent


async def stdin_lines():
    """An async iterator over the lines of stdin (EOF: the parent is gone)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        yield line.decode().strip()


def emit(kind: str, payload) -> None:
    sys.stdout.write(f"{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def make_token(uid: str, secret: str) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": uid, "role": "user", "iat": now, "exp": now + 3600}, secret,
                      algorithm="HS256")


async def role_sockets(a) -> None:
    """Hold /ws/balance sockets (one per user id in [lo, hi]) and record every message;
    optionally subscribe to the Redis reference channel and tap the user channels.

    stdout: ``READY {...}`` when every socket is open or has failed; then answers the stdin
    commands ``count``, ``check {json}``, ``dump PATH`` and ``quit``."""
    users = [str(u) for u in range(a.lo, a.hi + 1)]
    secret = os.environ["BENCH_JWT_SECRET"]
    events: list = []                       # (t, uid, seq) of balance_updates
    by_user: dict[str, list] = defaultdict(list)  # uid -> [(t, seq)]
    snapshots: dict[str, int] = {}
    other_types: Counter = Counter()
    closes: Counter = Counter()
    fails: Counter = Counter()
    retried: Counter = Counter()
    open_now = {"n": 0}
    ref_events: list = []                   # (t, i)
    tap_events: list = []                   # (t, uid, seq)
    sem = asyncio.Semaphore(a.concurrency)
    done = {"n": 0}

    async def handshake(uid: str):
        r, w = await ws_connect(a.host, a.port,
                                f"/ws/balance?token={make_token(uid, secret)}", a.timeout)
        try:
            return r, w, json.loads(await asyncio.wait_for(ws_message(r, w), a.timeout))
        except BaseException:
            w.close()
            raise

    async def one(uid: str):
        try:
            for attempt in range(3):
                try:
                    r, w, first = await handshake(uid)
                    break
                except (asyncio.TimeoutError, TimeoutError):
                    fails["timeout"] += 1  # the server is not answering: no retry
                    return
                except Exception as exc:  # refused, reset, closed, error after the upgrade
                    kind = type(exc).__name__ + (f": {exc}" if isinstance(exc, WSClosed) else "")
                    if attempt == 2:
                        fails[kind] += 1
                        return
                    retried[kind] += 1
                    await asyncio.sleep(0.5)
        finally:
            done["n"] += 1
            sem.release()
        snapshots[uid] = first.get("seq")
        open_now["n"] += 1
        try:
            while True:
                text = await ws_message(r, w)
                t = time.monotonic()
                if text.startswith('{"type": "balance_update"') or '"balance_update"' in text[:40]:
                    seq = json.loads(text)["seq"]
                    events.append((t, uid, seq))
                    by_user[uid].append((t, seq))
                else:
                    with contextlib.suppress(ValueError):
                        other_types[json.loads(text).get("type")] += 1
        except WSClosed as exc:
            closes[str(exc)] += 1
        finally:
            open_now["n"] -= 1

    async def redis_sub(cmd: str, arg: str, sink):
        r, w = await asyncio.open_connection(a.redis_host, a.redis_port)
        w.write(resp_cmd("CLIENT", "SETNAME", "benchtap"))  # not a hub (see psubscriptions)
        await resp_read(r)
        w.write(resp_cmd(cmd, arg))
        await resp_read(r)  # confirmation
        ready.set_result(None) if not ready.done() else None
        while True:
            msg = await resp_read(r)
            t = time.monotonic()
            sink(t, msg)

    def on_ref(t, msg):
        if msg[0] == b"message":
            ref_events.append((t, int(msg[2])))

    def on_tap(t, msg):
        if msg[0] == b"pmessage":
            data = json.loads(msg[3])
            if data.get("type") == "balance_update":
                tap_events.append((t, msg[2].decode().rsplit(":", 1)[1], data["seq"]))

    tasks = []
    if a.redis_port:
        for cmd, arg, sink in (("SUBSCRIBE", REF_CHANNEL, on_ref),
                               ("PSUBSCRIBE", TAP_PATTERN, on_tap)):
            ready = asyncio.get_running_loop().create_future()
            tasks.append(asyncio.create_task(redis_sub(cmd, arg, sink)))
            await asyncio.wait_for(ready, 10)

    t_start = time.monotonic()
    deadline = t_start + a.open_deadline
    launched = 0
    for uid in users:
        if fails["timeout"] >= a.max_fails or time.monotonic() > deadline:
            break
        await sem.acquire()
        tasks.append(asyncio.create_task(one(uid)))
        launched += 1
    while done["n"] < launched:
        await asyncio.sleep(0.05)
    emit("READY", {"launched": launched, "open": open_now["n"], "fails": dict(fails),
                   "retried": dict(retried),
                   "open_seconds": time.monotonic() - t_start,
                   "held": sorted(snapshots) if a.report_held else None})

    async for line in stdin_lines():
        cmd, _, arg = line.partition(" ")
        if cmd == "count":
            emit("COUNT", {"open": open_now["n"], "closes": dict(closes)})
        elif cmd == "check":
            req = json.loads(arg)
            end = time.monotonic() + req["timeout"]
            want = {u: s for u, s in req["seqs"].items()}
            got = {}
            while time.monotonic() < end and len(got) < len(want):
                for u, s in want.items():
                    if u not in got:
                        hit = [t for t, q in by_user.get(u, ()) if q == s]
                        if hit:
                            got[u] = hit[0]
                await asyncio.sleep(0.05)
            emit("CHECK", {"got": got})
        elif cmd == "dump":
            Path(arg).write_text(json.dumps({
                "events": events, "snapshots": snapshots, "other_types": dict(other_types),
                "closes": dict(closes), "fails": dict(fails), "ref": ref_events,
                "tap": tap_events, "open": open_now["n"]}))
            emit("DUMPED", {})
        elif cmd == "quit":
            break
    sys.stdout.flush()
    os._exit(0)  # closing thousands of sockets one by one is pointless; the kernel does it


async def role_load(a) -> None:
    """Open-loop purchases at a.rate (and/or Redis reference publishes at the same rate)."""
    rnd = random.Random(a.seed)
    users = [str(u) for u in range(a.lo, a.hi + 1)]
    pool = HttpPool(a.host, a.port, a.max_conns)
    n_warm = int(a.rate * a.warmup)
    total = n_warm + int(a.rate * a.duration)
    purchases: list = []
    errors: Counter = Counter()
    ref_pub: list = []
    prefix = f"bws{int(time.time())}{os.getpid()}"
    head = (f"POST /api/v1/verifications HTTP/1.1\r\nHost: {a.host}:{a.port}\r\n"
            f"Content-Type: application/json\r\nX-API-Key: {os.environ['BENCH_API_KEY']}\r\n")

    async def purchase(i: int, t_sched: float, uid: str):
        body = json.dumps({"id": f"{prefix}-{i}", "user_id": uid, "service_name": "WhatsApp",
                           "country": "US", "cost_cents": 1, "timeout_seconds": 300}).encode()
        raw = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        t_sent = None
        try:
            conn = await pool.acquire()
        except Exception as exc:
            errors["connect " + type(exc).__name__] += 1
            return
        try:
            status, resp, keep, t_sent = await HttpPool.exchange(conn, raw, 30)
            t_resp = time.monotonic()
        except Exception as exc:
            errors[type(exc).__name__] += 1
            pool.release(conn, False)
            return
        pool.release(conn, keep)
        seq = txid = None
        if 200 <= status < 300:
            tx = json.loads(resp)["transaction"]
            seq, txid = tx["seq"], tx["id"]
        purchases.append((i, i < n_warm, uid, t_sched, t_sent, t_resp, status, seq, txid))

    async def reference(t0: float):
        r, w = await asyncio.open_connection(a.redis_host, a.redis_port)
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(total):
            delay = t0 + (i + 0.5) / a.rate - time.monotonic()  # between two purchases
            if delay > 0:
                await asyncio.sleep(delay)
            t = time.monotonic()
            w.write(resp_cmd("PUBLISH", REF_CHANNEL, i))
            await resp_read(r)
            ref_pub.append((i, i < n_warm, t))
        w.close()

    t0 = time.monotonic() + 0.2
    ref_task = asyncio.create_task(reference(t0)) if a.ref else None
    tasks = set()
    if a.purchases:
        for i in range(total):
            t_sched = t0 + i / a.rate
            delay = t_sched - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(purchase(i, t_sched, rnd.choice(users)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    if ref_task:
        await ref_task
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    Path(a.out).write_text(json.dumps({
        "purchases": purchases, "errors": dict(errors), "ref": ref_pub, "t0": t0,
        "rate": a.rate, "n_warm": n_warm, "total": total if a.purchases else 0,
        "connections_opened": pool.opened, "unfinished": len(tasks)}))
    os._exit(0)


# =========================================================================================
# Orchestrator
# =========================================================================================

class Budget(BaseException):
    """The run's time budget is spent (a BaseException: nothing on the way may swallow it)."""


def wait_until(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child in its own session (its whole group is killed at the end). With ``pipe``, a
    line protocol over stdin/stdout (the role children)."""

    registry: list["Proc"] = []

    def __init__(self, name: str, argv: list[str], env: dict, workdir: Path, pipe=False):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            argv, env=env, cwd=ROOT, start_new_session=True, stderr=self._log,
            stdout=subprocess.PIPE if pipe else self._log,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL)
        self.lines: queue.Queue = queue.Queue()
        if pipe:
            threading.Thread(target=self._pump, daemon=True).start()
        Proc.registry.append(self)

    def _pump(self):
        for raw in self.popen.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def send(self, line: str) -> None:
        self.popen.stdin.write((line + "\n").encode())
        self.popen.stdin.flush()

    def expect(self, kind: str, timeout: float):
        """The payload of the next ``kind {json}`` line (RuntimeError on exit or timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: no {kind} within {timeout:.0f}s\n{self.tail()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited before {kind}\n{self.tail()}")
            if line.startswith(kind + " "):
                return json.loads(line[len(kind) + 1:])

    def stop(self, grace: float = 5.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                raw = Path("/proc", entry.name, "stat").read_text()
                if int(raw[raw.rindex(")") + 2:].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def mem_kb(pids: list[int]) -> dict:
    """Sum of VmRSS and of Pss (smaps_rollup) over ``pids``, in KB."""
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return {"rss_kb": rss, "pss_kb": pss}


def thread_ticks(pid: int) -> dict[int, int]:
    """utime+stime per thread of ``pid``."""
    out = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                raw = Path(entry.path, "stat").read_text()
                f = raw[raw.rindex(")") + 2:].split()
                out[int(entry.name)] = int(f[11]) + int(f[12])
    return out


def thread_share(t0: dict, t1: dict, pid: int, seconds: float) -> list:
    """[(thread, % of one CPU)] for the busiest threads of a process over a window."""
    rows = [("main" if tid == pid else f"thread {tid}",
             round(100 * (t1[tid] - t0.get(tid, 0)) / CLK_TCK / seconds, 1))
            for tid in t1 if seconds]
    return sorted(rows, key=lambda r: -r[1])[:4]


def sockstat_tcp() -> dict:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            f = line.split()[1:]
            return {f[i]: int(f[i + 1]) for i in range(0, len(f), 2)}
    return {}


def established_on(port: int, pids: list[int]) -> dict:
    """ESTABLISHED TCP connections whose local port is ``port``: total and per pid."""
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    rows.append(int(f[9]))
    per = {}
    for pid in pids:
        inodes = set()
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
        per[pid] = sum(1 for ino in rows if ino in inodes)
    return {"total": len(rows), "per_pid": per}


class CpuSampler(threading.Thread):
    """CPU time of the benchmark's parts (by process tree) and of everything else."""

    def __init__(self, roots, dbname: str):
        super().__init__(daemon=True)
        self.roots, self.dbname = roots, dbname  # callable -> {pid: kind}
        self.first: dict[int, int] = {}
        self.last: dict[int, tuple[str, int]] = {}
        self.cmdline: dict[int, str] = {}
        self.done = threading.Event()
        self.peak_backends = (0, 0, 0)  # (all, this benchmark's database, other databases)

    def _kind(self, pid, comm, ppids, roots) -> str:
        p, hops = pid, 0
        while p and hops < 20:
            if p in roots:
                return roots[p]
            p, hops = ppids.get(p), hops + 1
        if comm == "postgres":
            if pid not in self.cmdline:
                with contextlib.suppress(OSError):
                    self.cmdline[pid] = Path("/proc", str(pid), "cmdline").read_text()
            m = BACKEND.match(self.cmdline.get(pid, ""))
            if m is None or m.group(1) == self.dbname:
                return "postgres"
        return "other"

    def sample(self, first=False) -> None:
        stats = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    raw = Path("/proc", entry.name, "stat").read_text()
                    f = raw[raw.rindex(")") + 2:].split()
                    stats[int(entry.name)] = (raw[raw.index("(") + 1:raw.rindex(")")],
                                              int(f[1]), int(f[11]) + int(f[12]))
        ppids = {pid: s[1] for pid, s in stats.items()}
        roots = self.roots()
        ours = others = 0
        for pid, (comm, _ppid, ticks) in stats.items():
            if comm == "postgres":
                if pid not in self.cmdline:
                    with contextlib.suppress(OSError):
                        self.cmdline[pid] = Path("/proc", str(pid), "cmdline").read_text()
                m = BACKEND.match(self.cmdline.get(pid, ""))
                if m:
                    ours, others = (ours + 1, others) if m.group(1) == self.dbname else (
                        ours, others + 1)
            if first:
                self.first[pid] = ticks
            kind = self.last[pid][0] if pid in self.last else self._kind(pid, comm, ppids, roots)
            self.last[pid] = (kind, ticks)
        self.peak_backends = max(self.peak_backends, (ours + others, ours, others))

    def run(self):
        while not self.done.wait(0.25):
            self.sample()

    def __enter__(self):
        (self.busy0, self.irq0), self.wall0 = busy_ticks(), time.monotonic()
        self.sample(first=True)
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()
        self.sample()
        wall = time.monotonic() - self.wall0
        used: Counter = Counter()
        for pid, (kind, ticks) in self.last.items():
            if kind != "other":
                used[kind] += ticks - self.first.get(pid, 0)
        busy, irq = busy_ticks()
        busy, irq = busy - self.busy0, irq - self.irq0
        used["irq"] = irq
        used["other"] = max(0, busy - sum(used.values()))
        ncpu = os.cpu_count()
        self.result = {"seconds": round(wall, 1), "peak_pg_backends": {
                           "all": self.peak_backends[0], "ours": self.peak_backends[1],
                           "others": self.peak_backends[2]},
                       "busy_pct": round(100 * busy / CLK_TCK / wall / ncpu, 1),
                       "share_pct": {k: round(100 * v / CLK_TCK / wall / ncpu, 1)
                                     for k, v in used.items()}}
        return False


# -- Postgres ------------------------------------------------------------------------------

def pg(url: str):
    import psycopg

    return psycopg.connect(url, autocommit=True)


def seed(url: str, ranges: list[tuple[int, int]]) -> None:
    users = " UNION ALL ".join(f"SELECT g::text AS uid FROM generate_series({lo}, {hi}) g"
                               for lo, hi in ranges)
    with pg(url) as conn, conn.transaction():
        conn.execute(f"""
            INSERT INTO accounts (user_id, balance_cents, currency, last_seq,
                                  low_balance_threshold_cents, created_at, updated_at)
            SELECT uid, {SEED_BALANCE}, 'USD', 1, 100, now(), now() FROM ({users}) u""")
        conn.execute(f"""
            INSERT INTO transactions (user_id, seq, amount_cents, balance_after_cents, type,
                                      status, description, reference, created_at)
            SELECT uid, 1, {SEED_BALANCE}, {SEED_BALANCE}, 'credit', 'completed',
                   'Benchmark seed', 'bench-seed-' || uid, now() FROM ({users}) u""")
    with pg(url) as conn:
        conn.execute("VACUUM ANALYZE")


# -- the stack -----------------------------------------------------------------------------

PASS_THROUGH = ("TXMON_WEB_WORKERS", "TXMON_WEB_THREADS", "TXMON_WORKER_CONNECTIONS")


def _pool_label() -> str:
    """The API's SQLAlchemy pool per process, as shared/config.py sets it from the env."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from shared.config import engine_options

    opts = engine_options("postgresql+psycopg://")
    return f"{opts['pool_size']} + {opts['max_overflow']} overflow"


def gunicorn_settings(env: dict, extra: list[str]) -> dict:
    """What gunicorn.conf.py (evaluated with ``env``) plus ``extra`` flags configure."""
    import runpy

    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        ns = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out = {"worker_class": ns.get("worker_class", "sync"), "workers": int(ns.get("workers", 1)),
           "threads": int(ns.get("threads", 1)),
           "worker_connections": int(ns.get("worker_connections", 1000)),
           "worker_connections_source": "gunicorn.conf.py" if "worker_connections" in ns
           else "gunicorn's default"}
    if "--worker-connections" in extra:
        out["worker_connections"] = int(extra[extra.index("--worker-connections") + 1])
        out["worker_connections_source"] = "--worker-connections"
    return out


def settings_label(st: dict) -> str:
    label = f"{st['worker_class']}, {st['workers']} workers"
    if st["worker_class"] == "gthread":
        label += f" x {st['threads']} threads"
    return label + f", worker_connections {st['worker_connections']}"


class Stack:
    def __init__(self, args, workdir: Path, db_url: str):
        self.args, self.workdir = args, workdir
        self.redis_port = free_port()
        self.port = free_port()
        self.api_key = "bench-ws-" + secrets.token_hex(12)
        self.jwt_secret = secrets.token_hex(32)
        self.api: Proc | None = None
        self.worker: Proc | None = None
        self.redis: Proc | None = None
        self.clients: list[Proc] = []
        self.api_runs = 0
        self.settings: dict = {}
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("PROMETHEUS_", "CELERY_", "TXMON_", "GUNICORN"))
                    and k not in ("DATABASE_URL", "REDIS_URL", "SMTP_URL", "PORT")}
        self.env.update({
            "TXMON_BIND": "127.0.0.1", "PORT": str(self.port),
            "DATABASE_URL": db_url, "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "TXMON_SERVICE_KEYS": self.api_key, "TXMON_JWT_SECRET": self.jwt_secret,
            "TXMON_ACCESS_LOG": "/dev/null", "TXMON_WORKER_METRICS_PORT": "0",
            "TXMON_MAIL_DIR": str(workdir / "mail"), "TXMON_PUBLIC_URL":
            f"http://127.0.0.1:{self.port}", "PYTHONUNBUFFERED": "1",
        })

    @property
    def workers(self) -> int:
        return self.settings["workers"]

    def start_redis(self) -> None:
        self.redis = Proc("redis", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning",
            "--maxclients", "10000"], dict(os.environ), self.workdir)
        wait_until(self._redis_pong, 10, "redis-server")

    def _redis_pong(self) -> bool:
        if not self.redis.alive():
            raise RuntimeError("redis-server exited:\n" + self.redis.tail())
        with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.redis_port), 0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def redis_client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=5)

    def start_worker(self) -> None:
        env = dict(self.env, PROMETHEUS_MULTIPROC_DIR=str(self.workdir / "prom-worker"))
        os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
        self.worker = Proc("celery", [
            str(BIN / "celery"), "-A", "worker_service.celery_app", "worker", "-c", "2",
            "--loglevel=INFO", "-n", f"benchws-{secrets.token_hex(4)}@%h",
            "--without-mingle", "--without-gossip", *self.args.celery_arg], env, self.workdir)

    def wait_worker(self) -> None:
        def ready():
            if not self.worker.alive():
                raise RuntimeError("celery worker exited:\n" + self.worker.tail())
            text = self.worker.log_path.read_text(errors="replace")
            return " ready." in text and "Outbox relay started" in text
        wait_until(ready, 60, "celery worker ready")

    def start_api(self, worker_class: str, extra: list[str] | None = None) -> None:
        if self.api is not None:
            self.api.stop(grace=3)
        self.api_runs += 1
        prom = self.workdir / f"prom-api-{self.api_runs}"
        prom.mkdir(exist_ok=True)
        env = dict(self.env, TXMON_WORKER_CLASS=worker_class, PROMETHEUS_MULTIPROC_DIR=str(prom))
        for name in PASS_THROUGH:
            if name in os.environ:
                env[name] = os.environ[name]
        self.api_argv_extra = extra or []
        self.settings = gunicorn_settings(env, self.api_argv_extra)
        self.api = Proc(f"gunicorn-{self.api_runs}-{worker_class}", [
            str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "--no-control-socket",
            *self.api_argv_extra, "api_service.wsgi:app"], env, self.workdir)
        wait_until(self._healthy, 40, "gunicorn /healthz")
        wait_until(lambda: len(self.api_pids()) == self.workers + 1, 20, "gunicorn workers")

    def _healthy(self) -> bool:
        if not self.api.alive():
            raise RuntimeError("gunicorn exited:\n" + self.api.tail())
        with contextlib.suppress(Exception):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status == 200
        return False

    def api_pids(self) -> list[int]:
        return [self.api.pid, *children_of(self.api.pid)] if self.api else []

    def psubscriptions(self) -> int:
        r = self.redis_client()
        try:
            return sum(1 for c in r.client_list() if int(c.get("psub", 0)) > 0
                       and c.get("name") != "benchtap")
        finally:
            r.close()

    def metrics(self) -> dict:
        """websocket_* series from the API's /metrics."""
        out = {}
        with contextlib.suppress(Exception):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("websocket_") and not line.startswith("#"):
                        name, _, value = line.rpartition(" ")
                        out[name] = float(value)
        return out

    def client(self, name: str, role_args: list[str]) -> Proc:
        env = dict(self.env, BENCH_JWT_SECRET=self.jwt_secret, BENCH_API_KEY=self.api_key)
        proc = Proc(name, [sys.executable, "-u", str(Path(__file__).resolve()), "--role",
                           *role_args, "--host", "127.0.0.1", "--port", str(self.port),
                           "--redis-port", str(self.redis_port)], env, self.workdir, pipe=True)
        self.clients.append(proc)
        return proc

    def purchase(self, uid: str, vid: str) -> tuple[int, int | None, float]:
        body = json.dumps({"id": vid, "user_id": uid, "service_name": "WhatsApp",
                           "country": "US", "cost_cents": 1, "timeout_seconds": 300}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/v1/verifications",
                                     data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "X-API-Key": self.api_key})
        with urllib.request.urlopen(req, timeout=10) as r:
            data = json.loads(r.read())
            return r.status, data["transaction"]["seq"], time.monotonic()

    def log_mark(self) -> int:
        return self.api.log_path.stat().st_size if self.api else 0

    def log_errors(self, mark: int) -> dict:
        """ERROR lines gunicorn logged since ``mark``, by message (timestamps stripped)."""
        out: Counter = Counter()
        with contextlib.suppress(OSError), open(self.api.log_path, "rb") as f:
            f.seek(mark)
            for line in f.read().decode(errors="replace").splitlines():
                if " ERROR " in line:
                    out[line.split(" ERROR ", 1)[1][:120]] += 1
        return dict(out)

    def roots(self) -> dict:
        out = {os.getpid(): "clients"}
        if self.api:
            out[self.api.pid] = "gunicorn"
        if self.worker:
            out[self.worker.pid] = "celery"
        if self.redis:
            out[self.redis.pid] = "redis"
        for c in self.clients:
            out[c.pid] = "clients"
        return out

    def stop(self) -> None:
        for proc in reversed(Proc.registry):
            with contextlib.suppress(Exception):
                proc.stop(grace=4)


# -- phases --------------------------------------------------------------------------------

def phase_reference_alone(st: Stack, args, res: dict) -> None:
    log(f"reference alone: Redis PUBLISH -> SUBSCRIBE at {args.rate}/s for {args.ref_duration}s")
    sub = st.client("ref-sub", ["sockets", "--lo", "1", "--hi", "0"])
    sub.expect("READY", 20)
    out = st.workdir / "ref-load.json"
    with CpuSampler(st.roots, DBNAME) as cpu:
        pub = st.client("ref-pub", ["load", "--rate", str(args.rate), "--warmup", "1",
                                    "--duration", str(args.ref_duration), "--no-purchases",
                                    "--ref", "--out", str(out)])
        wait_until(lambda: not pub.alive(), args.ref_duration + 30, "reference publisher")
    time.sleep(0.3)
    sub.send(f"dump {st.workdir / 'ref-sub.json'}")
    sub.expect("DUMPED", 20)
    sub.send("quit")
    res["ref_alone"] = ref_stats(json.loads(out.read_text()),
                                 json.loads((st.workdir / "ref-sub.json").read_text()))
    res["ref_alone"]["cpu"] = cpu.result
    r = res["ref_alone"]
    log(f"  reference alone: p50 {r['rtt']['p50']:.3f} ms, p99 {r['rtt']['p99']:.3f} ms, "
        f"missing {r['missing']}")


def ref_stats(load: dict, sub: dict) -> dict:
    recv = {}
    for t, i in sub["ref"]:
        recv.setdefault(i, t)
    pubs = [(i, t) for i, warm, t in load["ref"] if not warm]
    rtt = [recv[i] - t for i, t in pubs if i in recv]
    span = (pubs[-1][1] - pubs[0][1]) if len(pubs) > 1 else 0
    return {"rtt": stats_ms(rtt), "published": len(pubs), "missing": len(pubs) - len(rtt),
            "rate": (len(pubs) - 1) / span if span else None}


def outbox_backlog(st: Stack) -> int | None:
    with contextlib.suppress(Exception), pg(st.env["DATABASE_URL"]) as conn:
        return conn.execute("SELECT count(*) FROM outbox WHERE dispatched_at IS NULL "
                            "AND available_at <= now()").fetchone()[0]
    return None


def celery_queue_depths(st: Stack, purge: bool = False) -> dict:
    """Tasks waiting in the broker per queue (and, with ``purge``, delete them)."""
    out = {}
    with contextlib.suppress(Exception):
        r = st.redis_client()
        for q in ("default", "notifications", "email", "alerts", "refunds", "realtime",
                  "reconcile", "outbox"):
            out[q] = r.llen(q)
            if purge:
                r.delete(q)
        r.close()
    return out


def phase_latency(st: Stack, args, res: dict, rate: float, warmup: float,
                  duration: float) -> dict:
    lo, hi = LAT_USER0, LAT_USER0 + args.accounts - 1
    tag = f"{rate:g}"
    log(f"latency: {args.accounts} sockets, {rate:g} purchases/s open-loop, "
        f"{warmup:g}s warm-up + {duration:g}s")
    recv = st.client(f"latency-sockets-{tag}", ["sockets", "--lo", str(lo), "--hi", str(hi),
                                                "--concurrency", "20", "--timeout", "15"])
    ready = recv.expect("READY", 60)
    if ready["open"] != args.accounts:
        raise RuntimeError(f"latency sockets: only {ready['open']} of {args.accounts} opened: "
                           f"{ready['fails']}")
    wait_until(lambda: st.psubscriptions() >= st.workers, 20,
               "every gunicorn worker's hub subscribed")
    out = st.workdir / f"latency-load-{tag}.json"
    before_metrics = st.metrics()
    mark = st.log_mark()
    threads0, t_threads0 = thread_ticks(st.worker.pid), time.monotonic()
    with CpuSampler(st.roots, DBNAME) as cpu:
        load = st.client(f"latency-load-{tag}", [
            "load", "--lo", str(lo), "--hi", str(hi), "--rate", str(rate),
            "--warmup", str(warmup), "--duration", str(duration), "--ref",
            "--max-conns", str(args.http_conns), "--out", str(out)])
        wait_until(lambda: not load.alive(), warmup + duration + 45, "load client")
    t_load_end = time.monotonic()
    backlog_at_end = outbox_backlog(st)
    data = json.loads(out.read_text())
    ok = {(p[2], p[7]) for p in data["purchases"] if 200 <= p[6] < 300}
    dump = st.workdir / f"latency-sockets-{tag}.json"

    def dumped():
        recv.send(f"dump {dump}")
        recv.expect("DUMPED", 30)
        return json.loads(dump.read_text())

    deadline = time.monotonic() + args.drain
    while True:  # wait (bounded) for the stragglers
        socks = dumped()
        got = {(u, s) for _t, u, s in socks["events"]}
        if ok <= got or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    threads1, t_threads1 = thread_ticks(st.worker.pid), time.monotonic()
    recv.send("quit")
    L = latency_stats(data, socks, args, rate)
    L.update({"rate_target": rate, "warmup": warmup, "duration": duration, "cpu": cpu.result,
              "drain_s": round(time.monotonic() - t_load_end, 1),
              "outbox_backlog_at_load_end": backlog_at_end,
              "outbox_backlog_after_drain": outbox_backlog(st)})
    # The relay is a thread of the Celery worker's main process: its CPU per purchase, and
    # the main (consumer) thread's, from the first purchase until the last update (or drain).
    L["celery_main_threads"] = thread_share(threads0, threads1, st.worker.pid,
                                            t_threads1 - t_threads0)
    n_ok = len([p for p in data["purchases"] if 200 <= p[6] < 300])
    L["celery_thread_cpu_ms_per_purchase"] = {
        name: round(share / 100 * (t_threads1 - t_threads0) * 1000 / n_ok, 2)
        for name, share in L["celery_main_threads"]} if n_ok else {}
    after_metrics = st.metrics()
    L["api_errors"] = st.log_errors(mark)
    L["metrics"] = {k: after_metrics.get(k, 0) - before_metrics.get(k, 0)
                    for k in after_metrics if "total" in k}
    # The purchase's other tasks (notification, e-mail, alert check) pile up in the broker
    # when the worker cannot keep up; record the depth, then drop them so the next phase
    # does not pay for this one's backlog.
    L["celery_queue_depths"] = celery_queue_depths(st, purge=True)
    with contextlib.suppress(Exception), pg(st.env["DATABASE_URL"]) as conn:
        conn.execute("UPDATE outbox SET dispatched_at = now(), completed_at = now() "
                     "WHERE dispatched_at IS NULL")
    res.setdefault("latency_runs", []).append(L)
    log(f"  achieved {L['achieved_rate']:.1f}/s; response->update p50 "
        f"{fmt(L['resp_to_update']['p50'])} ms p99 {fmt(L['resp_to_update']['p99'])} ms; "
        f"relay leg p99 {fmt(L['resp_to_redis']['p99'])} ms; not received {L['missing']}; "
        f"outbox backlog at end {backlog_at_end}; drain {L['drain_s']} s")
    return L


def latency_stats(load: dict, socks: dict, args, rate: float | None = None) -> dict:
    ws = {}
    dup = 0
    for t, u, s in socks["events"]:
        if (u, s) in ws:
            dup += 1
        else:
            ws[(u, s)] = t
    tap = {}
    for t, u, s in socks["tap"]:
        tap.setdefault((u, s), t)
    order_bad = 0
    per_user = defaultdict(list)
    for _t, u, s in socks["events"]:
        per_user[u].append(s)
    for u, seqs in per_user.items():
        start = socks["snapshots"].get(u)
        expect = list(range(start + 1, start + 1 + len(seqs))) if start is not None else seqs
        if seqs != expect:
            order_bad += 1
    meas = [p for p in load["purchases"] if not p[1]]
    good = [p for p in meas if 200 <= p[6] < 300]
    all_good = [p for p in load["purchases"] if 200 <= p[6] < 300]
    missing = [p for p in all_good if (p[2], p[7]) not in ws]
    sent = sorted(p[4] for p in meas)
    span = sent[-1] - sent[0] if len(sent) > 1 else 0
    resp_upd = [ws[(p[2], p[7])] - p[5] for p in good if (p[2], p[7]) in ws]
    req_upd = [ws[(p[2], p[7])] - p[4] for p in good if (p[2], p[7]) in ws]
    http = [p[5] - p[4] for p in good]
    lag = [p[4] - p[3] for p in meas]
    resp_tap = [tap[(p[2], p[7])] - p[5] for p in good if (p[2], p[7]) in tap]
    tap_ws = [ws[k] - tap[k] for k in ((p[2], p[7]) for p in good) if k in ws and k in tap]
    if getattr(args, "samples", None):
        # One line per measured purchase (CLOCK_MONOTONIC seconds): when a stall happened and
        # on which leg, which percentiles cannot tell.
        with open(args.samples, "a") as fh:
            for p in good:
                k = (p[2], p[7])
                fh.write(json.dumps({"rate": rate, "user": p[2], "seq": p[7],
                                     "request_sent": p[4], "response": p[5],
                                     "published": tap.get(k), "received": ws.get(k)}) + "\n")
    ref = ref_stats(load, socks)
    status = Counter(p[6] for p in load["purchases"])
    return {
        "sent": len(meas), "ok": len(good), "status": {str(k): v for k, v in status.items()},
        "errors": load["errors"], "unfinished": load["unfinished"],
        "achieved_rate": (len(sent) - 1) / span if span else 0,
        "ok_rate": (len(good) - 1) / span if span else 0,
        "connections_opened": load["connections_opened"],
        "resp_to_update": stats_ms(resp_upd), "req_to_update": stats_ms(req_upd),
        "http": stats_ms(http), "pacer_lag": stats_ms(lag),
        "resp_to_redis": stats_ms(resp_tap), "redis_to_socket": stats_ms(tap_ws),
        "update_before_response": sum(1 for d in resp_upd if d < 0),
        "missing": len(missing), "missing_measured": sum(1 for p in good
                                                         if (p[2], p[7]) not in ws),
        "duplicates": dup, "users_out_of_order": order_bad,
        "other_messages": socks["other_types"], "socket_closes": socks["closes"],
        "ref_under_load": ref,
    }


def warm_api(st: Stack, n_purchases: int = 20) -> None:
    """Sockets until every worker's hub holds its subscription, a few purchases; all closed."""
    import websocket

    from_tok = lambda uid: make_token(uid, st.jwt_secret)  # noqa: E731
    opened = []
    try:
        deadline = time.monotonic() + 30
        i = 0
        while st.psubscriptions() < st.workers:
            uid = str(LAT_USER0 + i % 50)
            i += 1
            if time.monotonic() > deadline:
                raise RuntimeError("hubs did not all subscribe during warm-up")
            try:
                ws = websocket.create_connection(
                    f"ws://127.0.0.1:{st.port}/ws/balance?token={from_tok(uid)}", timeout=10)
                opened.append(ws)
                ws.recv()
            except Exception:  # e.g. the shared Postgres briefly out of connections
                time.sleep(0.5)
                continue
            time.sleep(0.02)
        for j in range(n_purchases):
            for attempt in range(10):  # the shared Postgres may be out of connections briefly
                try:
                    st.purchase(str(LAT_USER0 + j % 50), f"bws-warm-{st.api_runs}-{j}")
                    break
                except urllib.error.HTTPError as exc:
                    if exc.code != 503 or attempt == 9:
                        raise
                    time.sleep(0.5)
        time.sleep(0.5)
    finally:
        for ws in opened:
            with contextlib.suppress(Exception):
                ws.close()


def phase_idle(st: Stack, args, res: dict, label: str, worker_class: str, extra: list[str],
               target: int, clients: int, timeout: float, max_fails: int,
               open_deadline: float, check_sample: int) -> dict:
    log(f"idle sockets [{label}]: gunicorn {worker_class} {' '.join(extra)}; "
        f"up to {target} sockets from {clients} client processes")
    st.start_api(worker_class, extra)
    out: dict = {"label": label, "worker_class": worker_class, "extra_args": extra,
                 "attempt_target": target, "settings": st.settings}
    if worker_class == "gevent":
        warm_api(st)
    time.sleep(2)
    out["before"] = mem_kb(st.api_pids())
    out["sockstat_before"] = sockstat_tcp()
    mark = st.log_mark()
    per = math.ceil(target / clients)
    procs = []
    with CpuSampler(st.roots, DBNAME) as cpu:
        for k in range(clients):
            lo = IDLE_USER0 + k * per
            hi = min(IDLE_USER0 + target - 1, lo + per - 1)
            procs.append(st.client(f"idle-{label}-{k}", [
                "sockets", "--lo", str(lo), "--hi", str(hi), "--concurrency",
                str(args.idle_concurrency), "--timeout", str(timeout), "--max-fails",
                str(max_fails), "--open-deadline", str(open_deadline), "--report-held"]))
        readies = [p.expect("READY", open_deadline + timeout + 30) for p in procs]
    out["open_cpu"] = cpu.result
    out["open_seconds"] = max(r["open_seconds"] for r in readies)
    out["launched"] = sum(r["launched"] for r in readies)
    fails: Counter = Counter()
    retried: Counter = Counter()
    for r in readies:
        fails.update(r["fails"])
        retried.update(r.get("retried", {}))
    out["fails"] = dict(fails)
    out["retried"] = dict(retried)
    time.sleep(args.idle_settle)
    counts = []
    for p in procs:
        p.send("count")
        counts.append(p.expect("COUNT", 20))
    out["held_client"] = sum(c["open"] for c in counts)
    out["closes"] = sum(sum(c["closes"].values()) for c in counts)
    pids = st.api_pids()
    est = established_on(st.port, pids[1:])
    out["held_server"] = sum(est["per_pid"].values())
    out["per_worker"] = sorted(est["per_pid"].values(), reverse=True)
    out["after"] = mem_kb(pids)
    out["sockstat_after"] = sockstat_tcp()
    out["per_process_after"] = {str(pid): mem_kb([pid]) for pid in pids}
    held = out["held_client"]
    for key in ("rss_kb", "pss_kb"):
        delta = out["after"][key] - out["before"][key]
        out[f"{key}_delta"] = delta
        out[f"{key}_per_socket"] = delta / held if held else None
    tcp_pages = out["sockstat_after"].get("mem", 0) - out["sockstat_before"].get("mem", 0)
    out["kernel_tcp_kb_delta"] = tcp_pages * os.sysconf("SC_PAGE_SIZE") // 1024
    if worker_class == "gevent":
        out["metrics_open"] = st.metrics().get("websocket_connections")
    # does the API still answer, and do held sockets still get their updates?
    t = time.monotonic()
    healthy = False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{st.port}/healthz", timeout=5) as r:
            out["healthz"] = f"{r.status} in {1000 * (time.monotonic() - t):.0f} ms"
            healthy = r.status == 200
    except Exception as exc:
        out["healthz"] = f"no answer within {time.monotonic() - t:.0f} s ({type(exc).__name__})"
    if check_sample and held and not healthy:
        out["check_skipped"] = "the API did not answer HTTP while the sockets were held"
    elif check_sample and held:
        rnd = random.Random(7)
        sample: dict[int, dict[str, int]] = {}
        t_resp: dict[str, float] = {}
        errors = 0
        stop_at = time.monotonic() + 20
        for k, r in enumerate(readies):
            for uid in rnd.sample(r["held"], min(len(r["held"]), check_sample // clients)):
                if errors >= 3 or time.monotonic() > stop_at:
                    break
                try:
                    _status, seq, t_resp[uid] = st.purchase(uid, f"bws-chk-{label}-{uid}")
                    sample.setdefault(k, {})[uid] = seq
                except Exception:
                    errors += 1
        got: dict[str, float] = {}
        for k, seqs in sample.items():
            procs[k].send("check " + json.dumps({"seqs": seqs, "timeout": 10}))
        for k in sample:
            got.update(procs[k].expect("CHECK", 30)["got"])
        out["check"] = {"purchased": len(t_resp), "errors": errors, "delivered": len(got),
                        "resp_to_update": stats_ms([got[u] - t_resp[u] for u in got])}
    out["api_errors"] = st.log_errors(mark)
    for p in procs:
        with contextlib.suppress(Exception):
            p.send("quit")
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(10)
    res.setdefault("idle", []).append(out)
    kb = out["rss_kb_per_socket"]
    log(f"  held {out['held_client']} (server sees {out['held_server']}: {out['per_worker']}), "
        f"fails {out['fails']}, RSS +{out['rss_kb_delta'] / 1024:.1f} MB = "
        f"{kb if kb is None else round(kb, 1)} KB/socket; check {out.get('check')}")
    return out


# -- report --------------------------------------------------------------------------------

def machine_info() -> dict:
    mem = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        mem[k] = int(v.split()[0])
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("gunicorn", "gevent", "greenlet", "flask_sock", "simple_websocket", "celery",
                "redis", "psycopg"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[mod] = version(mod.replace("_", "-"))
    with contextlib.suppress(Exception):
        versions["redis-server"] = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True,
            timeout=5).stdout.split()[2].removeprefix("v=")
    return {"nproc": os.cpu_count(), "mem_gib": mem["MemTotal"] / 2**20, "cpu_model": model,
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3], "versions": versions,
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def row_ms(name: str, s: dict, digits: int = 1) -> str:
    return (f"| {name} | {s['n']} | {fmt(s['p50'], digits)} | {fmt(s['p95'], digits)} | "
            f"{fmt(s['p99'], digits)} | {fmt(s['max'], digits)} |")


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def main_run(res: dict):
    runs = res.get("latency_runs", [])
    return next((r for r in runs if r["rate_target"] == res["args"]["rate"]), None)


def render(res: dict) -> str:
    m, a = res["machine"], res["args"]
    L = main_run(res)
    runs = res.get("latency_runs", [])
    idle = res.get("idle", [])
    ra = res.get("ref_alone")
    srv = res.get("server") or {"worker_class": "gevent", "workers": "?", "threads": "?",
                                "worker_connections": "?"}
    lines = [
        f"Measured {res['started']} by `scripts/bench_ws`; the numbers between these markers "
        "are from that run and are rewritten by the next one. To rerun (this run took "
        f"{res['elapsed_s'] / 60:.1f} minutes; hard limit {a['budget']} s; `--help` lists the "
        "knobs):", "", "```", res["command"], "```", "",
        f"- **Machine**: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']:.1f} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}; open-files limit {m['nofile']}. "
        f"Load average at the start: {' '.join(m['loadavg'])}. The machine is shared: every "
        "phase records the CPU share of *other* processes (CPU table). Load clients, gunicorn, "
        "the Celery worker, Redis and Postgres all run on these CPUs.",
        f"- **Server**: `gunicorn -c gunicorn.conf.py api_service.wsgi:app` with "
        f"`TXMON_WORKER_CLASS=gevent` and the file's other defaults: "
        f"{settings_label(srv)} per worker ({srv.get('worker_connections_source')}) unless a "
        f"row says otherwise; DB pool {_pool_label()} per worker; access log off (`/dev/null`), "
        "Prometheus multiprocess metrics on. One Celery worker (`celery -A "
        "worker_service.celery_app worker -c 2`) whose outbox relay thread (LISTEN/NOTIFY) "
        "publishes each balance update on Redis; the worker also runs each purchase's other "
        "outbox tasks (push notification, e-mail to a directory, alert check; the refund task "
        "waits for its 300 s ETA). A private "
        f"redis-server {m['versions'].get('redis-server', '')} on a free port; Postgres "
        f"{res.get('pg', {}).get('version', '?')} (synchronous_commit="
        f"{res.get('pg', {}).get('synchronous_commit', '?')}, max_connections="
        f"{res.get('pg', {}).get('max_connections', '?')}, shared: other users held "
        f"{res.get('pg', {}).get('connections_of_others_at_start', '?')} connections at the "
        f"start), fresh database `{DBNAME}`. Versions: " + ", ".join(
            f"{k} {v}" for k, v in m["versions"].items() if k != "redis-server") + ".",
        "- **Clients**: asyncio processes of scripts/bench_ws.py (their own minimal websocket, "
        f"HTTP/1.1 and RESP code; purchases over at most {a['http_conns']} keep-alive "
        "connections); all timestamps are CLOCK_MONOTONIC, which every process on the machine "
        "shares.", "",
    ]
    # -- summary
    lines += ["### Summary", "", "| what | measured | target | met? |",
              "| --- | ---: | ---: | --- |"]
    if L:
        p99 = L["resp_to_update"]["p99"]
        lines.append(
            f"| purchase response -> `balance_update` received at {a['rate']:g} purchases/s: "
            f"p50 / p99 | {fmt(L['resp_to_update']['p50'])} / {fmt(p99)} ms | p99 <= "
            f"{TARGET_P99_MS:.0f} ms | "
            f"{met(p99 is not None and p99 <= TARGET_P99_MS and L['missing'] == 0)} |")
        lines.append(f"| purchase rate achieved (target {a['rate']:g}/s, open-loop) | "
                     f"{L['achieved_rate']:.1f}/s sent, {L['ok_rate']:.1f}/s 2xx | "
                     f"{a['rate']:g}/s | {met(L['ok_rate'] >= 0.98 * a['rate'])} |")
        bad = L["missing"] or L["duplicates"] or L["users_out_of_order"]
        lines.append(f"| `balance_update`s not received (within {L['drain_s']} s after the "
                     f"load) / duplicated / users out of seq order | {L['missing']} / "
                     f"{L['duplicates']} / {L['users_out_of_order']} | 0 | {met(not bad)} |")
    for r in runs:
        if r is not L:
            lines.append(
                f"| the same at {r['rate_target']:g} purchases/s (for comparison): p50 / p99 | "
                f"{fmt(r['resp_to_update']['p50'])} / {fmt(r['resp_to_update']['p99'])} ms "
                "| - | - |")
    for i in idle:
        if i["worker_class"] != "gevent":
            continue
        kb = i["rss_kb_per_socket"]
        setting = settings_label(i["settings"])
        lines.append(f"| idle sockets one API host holds ({setting}) | "
                     f"{i['held_client']} | >= {TARGET_SOCKETS} | "
                     f"{met(i['held_client'] >= TARGET_SOCKETS)} |")
        lines.append(f"| memory per idle socket, RSS of the gunicorn tree ({setting}) | "
                     f"{fmt(kb)} KB | <= {TARGET_KB:.0f} KB | "
                     f"{met(kb is not None and kb <= TARGET_KB)} |")
    if ra:
        lines.append(f"| reference: raw Redis PUBLISH -> subscriber on loopback at "
                     f"{a['rate']:g}/s, alone: p50 / p99 | {fmt(ra['rtt']['p50'], 2)} / "
                     f"{fmt(ra['rtt']['p99'], 2)} ms | - | - |")
    if L:
        rl = L["ref_under_load"]["rtt"]
        lines.append(f"| reference, the same during the {a['rate']:g}/s purchase load: "
                     f"p50 / p99 | {fmt(rl['p50'], 2)} / {fmt(rl['p99'], 2)} ms | - | - |")
    lines.append("")
    # -- latency
    if runs:
        lines += ["### Purchase -> balance_update latency", "",
                  f"{a['accounts']} accounts, one /ws/balance socket each (`?token=`, no "
                  "`since_seq`); purchases (`POST /api/v1/verifications`, `cost_cents` 1, unique "
                  "ids) paced open-loop over random accounts; the warm-up is not counted. Each "
                  "purchase is matched with its `balance_update` by (user id, seq) from the HTTP "
                  "response. *Published on Redis* is when a raw pattern subscriber on "
                  "`txmon:rt:user:*` received the relay's PUBLISH: it splits the path into the "
                  "relay leg (commit -> NOTIFY -> outbox relay thread -> PUBLISH) and the hub "
                  "leg (Redis -> the API process's hub -> the socket's queue -> websocket "
                  "frame). Negative values: the update arrived before the HTTP response (the "
                  "relay wakes at commit). The reference publishes at the same rate, half-way "
                  "between two purchases, on its own channel.", ""]
        for r in runs:
            title = (f"{r['rate_target']:g} purchases/s"
                     + (" (the target)" if r is L else " (a lower rate, for comparison)"))
            lines += [f"#### At {title}: {r['warmup']:g} s warm-up, {r['duration']:g} s "
                      "measured", "",
                      "| interval (ms) | n | p50 | p95 | p99 | max |",
                      "| --- | ---: | ---: | ---: | ---: | ---: |",
                      row_ms("**purchase response -> balance_update received**",
                             r["resp_to_update"]),
                      row_ms("purchase request sent -> balance_update received",
                             r["req_to_update"]),
                      row_ms("HTTP request sent -> response received", r["http"]),
                      row_ms("purchase response -> published on Redis (relay leg)",
                             r["resp_to_redis"]),
                      row_ms("published on Redis -> balance_update received (hub leg)",
                             r["redis_to_socket"]),
                      row_ms("reference: Redis PUBLISH -> subscriber, during this load",
                             r["ref_under_load"]["rtt"], 2),
                      row_ms("load client: request sent - scheduled (pacing lag)",
                             r["pacer_lag"], 1), ""]
            thr = ", ".join(f"{name} {ms} ms" for name, ms in
                            r.get("celery_thread_cpu_ms_per_purchase", {}).items())
            lines += [
                f"- Rate: {r['achieved_rate']:.1f} purchases/s sent, {r['ok_rate']:.1f}/s "
                f"answered 2xx ({r['ok']} of {r['sent']} measured; status codes over the whole "
                f"run {r['status']}; client errors {r['errors'] or 'none'}; "
                f"{r['connections_opened']} HTTP connections used; errors the API logged: "
                f"{r.get('api_errors') or 'none'}). A pacing lag well above 0 means every "
                "connection was busy: the API answered slower than the schedule.",
                f"- Updates not received within {r['drain_s']} s after the load (all 2xx "
                f"purchases, warm-up included): **{r['missing']}**; duplicates "
                f"{r['duplicates']}; users whose updates were not exactly seq snapshot+1, +2, "
                f"... in order: {r['users_out_of_order']}; updates ahead of their HTTP response: "
                f"{r['update_before_response']}. Other messages: {r['other_messages'] or 'none'}"
                f"; sockets closed by the server: {r['socket_closes'] or 'none'}; API counters: "
                f"{ {k: int(v) for k, v in r.get('metrics', {}).items()} or 'n/a'}.",
                f"- Outbox rows due but not yet dispatched by the relay: "
                f"{r['outbox_backlog_at_load_end']} when the load stopped, "
                f"{r['outbox_backlog_after_drain']} after the drain (then marked dispatched, "
                "and the broker queues purged, so that the next phase does not pay for this "
                "one). CPU per purchase of the Celery worker's main-process threads (the relay "
                f"is the busiest non-main thread; main is Celery's consumer): {thr or 'n/a'}. "
                f"Tasks left in the broker: {r['celery_queue_depths']}.", ""]
    # -- idle
    if idle:
        lines += ["### Idle sockets on one API host", "",
                  "gunicorn is served afresh for each row; the hubs are warmed up (sockets until "
                  "every worker's hub holds its Redis subscription, then 20 purchases) and "
                  "closed, then the gunicorn tree's memory is read (*before*). Client processes "
                  "open authenticated /ws/balance sockets (one user each, `?token=`, at most "
                  f"{a['idle_concurrency']} handshakes in flight per process, "
                  f"{a['idle_timeout']:g} s handshake timeout) and wait for each `snapshot`; a "
                  f"client stops after {a['idle_max_fails']} handshake timeouts (the server no "
                  "longer accepting); a handshake that fails otherwise (an error) is retried "
                  f"twice. After {a['idle_settle']:g} s idle the sockets still open "
                  "are counted on both sides (server side: ESTABLISHED TCP connections owned by "
                  "each worker, from /proc) and memory is read again (*after*). KB per socket = "
                  "(after - before) / sockets held; RSS sums the master and the workers, PSS "
                  "counts shared pages once. Then /healthz is requested and one purchase per "
                  "sampled user must reach that user's idle socket.", "",
                  "| worker class, settings | sockets held (client / server) | per worker | "
                  "failed handshakes | time to open | RSS before -> after | KB/socket, RSS | "
                  "KB/socket, PSS | /healthz while held | sample: delivered, response -> "
                  "update p50 / max |",
                  "| --- | ---: | --- | --- | ---: | --- | ---: | ---: | --- | --- |"]
        for i in idle:
            setting = settings_label(i["settings"])
            chk = i.get("check")
            chk_s = (f"{chk['delivered']}/{chk['purchased']}"
                     + (f" ({chk['errors']} purchases failed)" if chk["errors"] else "")
                     + f", {fmt(chk['resp_to_update']['p50'])} / "
                     f"{fmt(chk['resp_to_update']['max'])} ms" if chk else
                     "not checked" + (f": {i['check_skipped']}" if i.get("check_skipped")
                                      else ""))
            fails = ", ".join(f"{k} {v}" for k, v in i["fails"].items()) or "0"
            if i.get("retried"):
                fails += "; retried after an error: " + ", ".join(
                    f"{k} {v}" for k, v in i["retried"].items())
            if i.get("api_errors"):
                fails += "; API logged " + ", ".join(f"{v}x {k}"
                                                     for k, v in i["api_errors"].items())
            lines.append(
                f"| {setting} | {i['held_client']} / {i['held_server']} | "
                f"{', '.join(map(str, i['per_worker']))} | {fails} (of {i['launched']} tried) | "
                f"{i['open_seconds']:.1f} s | {i['before']['rss_kb'] / 1024:.0f} -> "
                f"{i['after']['rss_kb'] / 1024:.0f} MB | {fmt(i['rss_kb_per_socket'])} | "
                f"{fmt(i['pss_kb_per_socket'])} | "
                f"{i['healthz']} | {chk_s} |")
        lines += ["", "Kernel socket buffers are outside these numbers (not in any RSS); idle "
                  "sockets have empty buffers.", ""]
    # -- cpu
    lines += ["### CPU during the phases", "",
              "Share of all CPUs, sampled from /proc: *clients* are this benchmark's load "
              "processes, *irq* interrupt time (loopback networking) and steal, *other "
              "processes* everything not started by this benchmark (the machine is shared). "
              "Peak Postgres connections: client backends of this benchmark's database and of "
              "the other databases on the same server, sampled every 0.25 s (max_connections "
              f"{res.get('pg', {}).get('max_connections', '?')}).", "",
              "| phase | seconds | machine busy | gunicorn | celery | postgres | redis | "
              "clients | irq | other processes | peak Postgres connections: ours / others |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    cpus = []
    if ra:
        cpus.append(("Redis reference alone", ra["cpu"]))
    for r in runs:
        cpus.append((f"latency, {r['rate_target']:g} purchases/s", r["cpu"]))
    for i in idle:
        cpus.append((f"opening idle sockets ({settings_label(i['settings'])})",
                     i["open_cpu"]))
    for name, c in cpus:
        sh = c["share_pct"]
        pb = c.get("peak_pg_backends", {})
        lines.append(f"| {name} | {c['seconds']} | {c['busy_pct']}% | " + " | ".join(
            f"{sh.get(k, 0)}%" for k in ("gunicorn", "celery", "postgres", "redis", "clients",
                                         "irq", "other"))
            + f" | {pb.get('ours', '-')} / {pb.get('others', '-')} |")
    lines.append("")
    notes = res.get("notes") or []
    if notes:
        lines += ["### Observations from this run", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def derive_notes(res: dict) -> list[str]:
    notes = []
    L = main_run(res)
    if L and L["resp_to_update"]["p99"] is not None:
        r2r, h = L["resp_to_redis"], L["redis_to_socket"]
        notes.append(
            f"At {L['rate_target']:g}/s the p99 splits into relay leg {fmt(r2r['p99'])} ms "
            f"(response -> PUBLISH seen on Redis) and hub leg {fmt(h['p99'])} ms (Redis -> "
            f"socket); the raw Redis round trip under the same load is "
            f"{fmt(L['ref_under_load']['rtt']['p99'], 2)} ms at p99.")
        if L["ok_rate"] < 0.98 * L["rate_target"]:
            notes.append(
                f"The stack answered {L['ok_rate']:.0f} purchases/s, not "
                f"{L['rate_target']:g}: past that rate requests queue (see the pacing lag and "
                "the HTTP response times), so the latencies at the target rate are those of "
                "an overloaded stack on this machine (see the CPU table).")
    gev = [i for i in res.get("idle", []) if i["worker_class"] == "gevent"]
    dflt = next((i for i in gev if not i["extra_args"]), None)
    if dflt and dflt["held_client"] < TARGET_SOCKETS and dflt["per_worker"] \
            and max(dflt["per_worker"]) >= 0.99 * dflt["settings"]["worker_connections"]:
        wc = dflt["settings"]["worker_connections"]
        notes.append(
            f"With the defaults the host held {dflt['held_client']} sockets: gunicorn's gevent "
            f"worker serves at most `worker_connections` ({wc}, "
            f"{dflt['settings']['worker_connections_source']}) connections per worker, so "
            f"{dflt['settings']['workers']} workers stop at {wc * dflt['settings']['workers']}; "
            "further handshakes wait in the listen backlog until they time out. The raised row "
            "shows what the host holds without that cap.")
    if dflt and dflt.get("check_skipped"):
        notes.append(
            f"With the defaults and {dflt['held_client']} sockets held, the API host no longer "
            f"answered HTTP (/healthz: {dflt['healthz']}): a full gevent pool stops the worker "
            "from accepting any connection, so sockets and API requests share one limit.")
    for r in res.get("latency_runs", []):
        db_err = sum(v for k, v in (r.get("api_errors") or {}).items()
                     if "Database unavailable" in k)
        if db_err:
            pb = r["cpu"].get("peak_pg_backends", {})
            notes.append(
                f"At {r['rate_target']:g}/s the API answered {db_err} purchases 503 "
                "(\"Database unavailable: OperationalError\"): Postgres was out of connections "
                f"(peak {pb.get('ours')} of this benchmark + {pb.get('others')} of other "
                f"users, max_connections {res.get('pg', {}).get('max_connections')}). Under "
                f"gevent the SQLAlchemy pool ({_pool_label()} per worker) and the admission "
                "limit (TXMON_HTTP_CONCURRENCY) bound the API's concurrent database sessions.")
    gth = next((i for i in res.get("idle", []) if i["worker_class"] == "gthread"), None)
    if gth:
        g = gth["settings"]
        notes.append(
            f"With TXMON_WORKER_CLASS=gthread ({g['workers']} workers x {g['threads']} threads) "
            f"the host held {gth['held_client']} sockets: each websocket occupies a thread for "
            f"its whole life; with every thread taken, /healthz: {gth['healthz']}.")
    return notes


def write_doc(body: str) -> None:
    """Replace the text between the markers (append heading + markers when missing)."""
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    block = f"{MARK_BEGIN}\n{body.rstrip()}\n{MARK_END}"
    start, end = text.find(MARK_BEGIN), text.find(MARK_END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(MARK_END):]
    else:
        # The heading stays outside the markers, before them: a section that ends at the next
        # "## " heading (scripts/bench_write's) then never swallows the opening marker.
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{block}\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_suffix(".md.bench_ws.tmp")
    tmp.write_text(text)
    os.replace(tmp, DOC)


# -- main ----------------------------------------------------------------------------------

def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def orchestrate(args) -> int:
    t_start = time.monotonic()
    nofile = raise_nofile()
    if nofile < args.idle_target + 1000:
        log(f"warning: open-files limit {nofile} is low for {args.idle_target} sockets")

    def on_alarm(*_):
        raise Budget(f"time budget of {args.budget} s exceeded")

    signal.signal(signal.SIGALRM, on_alarm)
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: where is it stuck?
    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(args.budget)
    res: dict = {"started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "machine": machine_info(), "args": vars(args).copy(),
                 "command": "scripts/bench_ws" + ("" if not args.argv else " " + " ".join(
                     args.argv))}
    workdir = Path(tempfile.mkdtemp(prefix="txmon-bench-ws-"))
    log(f"work directory (logs, raw data): {workdir}")
    admin = admin_url()
    db_url = admin.split("?", 1)[0].rsplit("/", 1)[0] + "/" + DBNAME
    st = Stack(args, workdir, db_url)
    failure = None
    try:
        with pg(admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{DBNAME}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{DBNAME}"')
            res["pg"] = {k: conn.execute(f"SHOW {k}").fetchone()[0]
                         for k in ("server_version", "synchronous_commit", "max_connections")}
            res["pg"]["version"] = res["pg"].pop("server_version")
            res["pg"]["connections_of_others_at_start"] = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND datname IS DISTINCT FROM %s", (DBNAME,)).fetchone()[0]
        log(f"database {DBNAME}: migrating and seeding")
        mig = subprocess.run([str(BIN / "flask"), "--app", "api_service", "db", "upgrade"],
                             cwd=ROOT, env=dict(st.env), capture_output=True, text=True,
                             timeout=120)
        if mig.returncode:
            raise RuntimeError("migration failed:\n" + mig.stdout[-2000:] + mig.stderr[-2000:])
        seed(db_url, [(LAT_USER0, LAT_USER0 + args.accounts - 1),
                      (IDLE_USER0, IDLE_USER0 + args.idle_target - 1)])
        log("starting redis-server, the Celery worker and gunicorn (gevent)")
        st.start_redis()
        st.start_worker()
        st.start_api("gevent")
        res["server"] = st.settings
        res["workers"] = st.workers
        st.wait_worker()
        warm_api(st)
        phase_reference_alone(st, args, res)
        if args.low_rate:
            phase_latency(st, args, res, args.low_rate, 2, args.low_duration)
        phase_latency(st, args, res, args.rate, args.warmup, args.duration)
        if args.skip_idle:
            raise SystemExit(0)
        d = phase_idle(st, args, res, "default", "gevent", [], args.idle_target,
                       args.idle_clients, args.idle_timeout, args.idle_max_fails,
                       args.idle_open_deadline, args.check_sample)
        capped = d["per_worker"] and max(d["per_worker"]) >= 0.99 * d["settings"][
            "worker_connections"]
        if d["held_client"] < args.idle_target and capped and not args.no_raised:
            wc = math.ceil(args.idle_target * 1.25 / st.workers)
            phase_idle(st, args, res, "raised", "gevent", ["--worker-connections", str(wc)],
                       args.idle_target, args.idle_clients, args.idle_timeout,
                       args.idle_max_fails, args.idle_open_deadline, args.check_sample)
        if not args.no_gthread:
            phase_idle(st, args, res, "gthread", "gthread", [], 100, 1, 4.0, 30, 20, 0)
    except SystemExit:
        pass
    except (Exception, Budget, KeyboardInterrupt) as exc:
        failure = exc
        log(f"FAILED: {type(exc).__name__}: {exc}")
    finally:
        signal.alarm(0)
        log("stopping everything and dropping the database")
        st.stop()
        with contextlib.suppress(Exception), pg(admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{DBNAME}" WITH (FORCE)')
    res["elapsed_s"] = time.monotonic() - t_start
    res["notes"] = derive_notes(res)
    if failure is not None:
        res["notes"].append(f"This run did not finish: {type(failure).__name__}: "
                            f"{str(failure).splitlines()[0] if str(failure) else ''}; rows "
                            "missing above were not measured.")
    (workdir / "results.json").write_text(json.dumps(res, indent=1, default=str))
    if res.get("latency_runs") and not args.no_doc:
        write_doc(render(res))
        log(f"wrote {DOC.relative_to(ROOT)} (between {MARK_BEGIN} and {MARK_END})")
    print(render(res))
    log(f"done in {res['elapsed_s']:.0f} s; raw results in {workdir / 'results.json'}")
    return 1 if failure is not None else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--rate", type=float, default=200, help="purchases per second (200)")
    p.add_argument("--duration", type=float, default=20, help="measured seconds (20)")
    p.add_argument("--warmup", type=float, default=3, help="warm-up seconds (3)")
    p.add_argument("--drain", type=float, default=30,
                   help="max seconds to wait for straggling updates (30)")
    p.add_argument("--low-rate", type=float, default=50,
                   help="also measure at this rate first, for comparison; 0: don't (50)")
    p.add_argument("--low-duration", type=float, default=10,
                   help="measured seconds at --low-rate (10)")
    p.add_argument("--ref-duration", type=float, default=10,
                   help="seconds of the Redis reference alone (10)")
    p.add_argument("--accounts", type=int, default=200, help="latency accounts/sockets (200)")
    p.add_argument("--idle-target", type=int, default=6000, help="idle sockets to try (6000)")
    p.add_argument("--idle-clients", type=int, default=2, help="idle client processes (2)")
    p.add_argument("--idle-concurrency", type=int, default=8,
                   help="handshakes in flight per idle client process (8)")
    p.add_argument("--idle-timeout", type=float, default=6, help="handshake timeout, s (6)")
    p.add_argument("--idle-max-fails", type=int, default=24,
                   help="handshake timeouts after which a client stops opening (24)")
    p.add_argument("--idle-open-deadline", type=float, default=60,
                   help="seconds a client keeps opening sockets (60)")
    p.add_argument("--idle-settle", type=float, default=5, help="idle seconds before counting (5)")
    p.add_argument("--check-sample", type=int, default=50,
                   help="held sockets that must get a purchase's update (50)")
    p.add_argument("--no-raised", action="store_true",
                   help="skip the gevent run with worker_connections raised")
    p.add_argument("--no-gthread", action="store_true", help="skip the gthread comparison")
    p.add_argument("--http-conns", type=int, default=64,
                   help="max keep-alive HTTP connections of the purchase client (64)")
    p.add_argument("--celery-arg", action="append", default=[],
                   help="extra argument for the Celery worker, for diagnostics, e.g. "
                        "--celery-arg=-Q --celery-arg=reconcile (the consumer idle; repeatable)")
    p.add_argument("--skip-idle", action="store_true", help="latency only (implies --no-doc)")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/PERFORMANCE.md")
    p.add_argument("--samples", metavar="FILE",
                   help="append every measured purchase's timestamps to FILE as JSON lines")
    p.add_argument("--budget", type=int, default=360, help="hard time limit, s (360)")
    p.add_argument("--render", metavar="RESULTS_JSON",
                   help="only rewrite the doc section from a previous run's results.json")
    # child roles (internal)
    p.add_argument("--role", choices=("sockets", "load"), help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--redis-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--lo", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--hi", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=10, help=argparse.SUPPRESS)
    p.add_argument("--max-fails", type=int, default=10**9, help=argparse.SUPPRESS)
    p.add_argument("--open-deadline", type=float, default=120, help=argparse.SUPPRESS)
    p.add_argument("--report-held", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-purchases", dest="purchases", action="store_false",
                   help=argparse.SUPPRESS)
    p.add_argument("--ref", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-conns", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role:
        raise_nofile()
        args.redis_host = "127.0.0.1"
        coro = role_sockets(args) if args.role == "sockets" else role_load(args)
        asyncio.run(coro)
        return 0
    args.argv = argv
    if args.render:
        res = json.loads(Path(args.render).read_text())
        failure_notes = [n for n in res.get("notes", []) if n.startswith("This run did not")]
        res["notes"] = derive_notes(res) + failure_notes
        write_doc(render(res))
        log(f"rewrote {DOC.relative_to(ROOT)} from {args.render}")
        return 0
    args.no_doc = args.no_doc or args.skip_idle
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
