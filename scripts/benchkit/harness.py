"""The stack as scripts/run starts it (TXMON_DEMO=0) on a fresh PostgreSQL database, with a
private redis-server (scripts/run's ephemeral one, on a free port) and an aiosmtpd sink as
SMTP_URL; seeding, load generation (wrk, or requests sessions at a fixed rate) and waits."""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jwt
import psycopg
import requests

ROOT = Path(__file__).resolve().parents[2]
LUA = Path(__file__).with_name("purchases.lua")
USER0 = 1000001  # accounts are USER0, USER0 + 1, ...; numeric, for wrk's and pgbench's random()
SEED_CENTS = 10**12


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin_url() -> str:
    """A superuser URL on the server to use: DATABASE_URL's server, else the local one."""
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql")):
        url = re.sub(r"^postgres(ql)?(\+psycopg)?://", "postgresql://", url)
        return url.split("?", 1)[0].rsplit("/", 1)[0] + "/postgres"
    return "postgresql://postgres@127.0.0.1:5432/postgres"


def machine_line() -> str:
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (f"{os.cpu_count()} CPUs ({model.group(1).strip() if model else '?'}), load average "
            f"at the start {' '.join(load)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


class Stack:
    """``with Stack() as stack:`` starts everything; leaving the block stops it and drops the
    database."""

    def __init__(self, tag: str = "bench"):
        self.dbname = f"txmon_{tag}_{secrets.token_hex(3)}"
        self.db_url = admin_url().rsplit("/", 1)[0] + "/" + self.dbname
        self.port, self.smtp_port = free_port(), free_port()
        self.key, self.secret = secrets.token_hex(16), secrets.token_hex(32)
        self.tmp = Path(tempfile.mkdtemp(prefix="txmon-bench-"))
        self.mail_log = self.tmp / "mail.tsv"
        self.url = f"http://127.0.0.1:{self.port}"
        self.run = self.sink = None

    def __enter__(self) -> "Stack":
        with psycopg.connect(admin_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}"')
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        self.sink = subprocess.Popen([sys.executable, "-m", "benchkit.smtpsink",
                                      str(self.smtp_port), str(self.mail_log)],
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.sink.stdout.readline()
        self.env = dict(os.environ, DATABASE_URL=self.db_url, PORT=str(self.port),
                        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                        SMTP_URL=f"smtp://127.0.0.1:{self.smtp_port}",
                        FLOWER_PORT=str(free_port()),
                        TXMON_WORKER_METRICS_PORT=str(free_port()),
                        TXMON_DEMO="0", TXMON_SERVICE_KEYS=self.key,
                        TXMON_JWT_SECRET=self.secret)
        self.run_log = open(self.tmp / "run.log", "w")
        log(f"scripts/run on {self.dbname}, API :{self.port}, output in {self.tmp}/run.log")
        self.run = subprocess.Popen([str(ROOT / "scripts" / "run")], env=self.env, cwd=ROOT,
                                    stdout=self.run_log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.api = requests.Session()
        self.api.headers["X-API-Key"] = self.key
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.run.poll() is not None:
                raise SystemExit(f"scripts/run exited: {(self.tmp / 'run.log').read_text()}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("the API did not become ready")
        # Every service of scripts/run up: the worker's metrics port answers.
        self.wait(lambda: self.roles_present() >= {"api", "worker", "beat", "flower"}, 60,
                  "all services")

    def stop(self) -> None:
        if self.run is not None and self.run.poll() is None:
            os.kill(self.run.pid, signal.SIGTERM)
            try:
                self.run.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.run.pid, signal.SIGKILL)
                self.run.wait()
        if self.sink is not None and self.sink.poll() is None:
            self.sink.terminate()
            self.sink.wait()
        with psycopg.connect(admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')

    # -- looking at it -------------------------------------------------------------------
    def pids(self, name: str) -> list[int]:
        """Processes of one role of scripts/run's tree (see cpu.role)."""
        from benchkit import cpu
        procs = cpu.processes()
        out = []
        for pid, (comm, _, _, cmd) in procs.items():
            ancestors, p = set(), pid
            while p in procs and p > 1:
                ancestors.add(p)
                p = procs[p][1]
            if cpu.role(cmd, comm, ancestors, self.run.pid, -1, self.dbname) == name:
                out.append(pid)
        return out

    def roles_present(self) -> set[str]:
        return {r for r in ("api", "worker", "beat", "flower", "redis") if self.pids(r)}

    def rss_mb(self, name: str) -> float:
        total = 0
        for pid in self.pids(name):
            try:
                m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
                total += int(m.group(1)) if m else 0
            except OSError:
                pass
        return total / 1024

    def signal(self, names: tuple[str, ...], sig: int) -> None:
        """SIGSTOP / SIGCONT the processes of some roles (the worker paused: the API alone)."""
        for name in names:
            for pid in self.pids(name):
                os.kill(pid, sig)

    @contextlib.contextmanager
    def paused(self, names: tuple[str, ...] = ("worker", "beat")):
        """Worker and beat stopped (SIGSTOP) inside the block: the API, or pgbench, alone."""
        self.signal(names, signal.SIGSTOP)
        try:
            yield
        finally:
            self.signal(names, signal.SIGCONT)

    def sql(self, query: str, *params):
        with psycopg.connect(self.db_url, autocommit=True,
                             options="-c lock_timeout=30s") as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else None

    def settle(self, where: str = "true", *params) -> None:
        """Mark undone outbox rows done (follow-ups of pgbench's purchases, not worth doing);
        rows a paused worker holds are skipped."""
        self.sql("UPDATE outbox SET completed_at = now() WHERE id IN (SELECT id FROM outbox "
                 f"WHERE completed_at IS NULL AND {where} FOR UPDATE SKIP LOCKED)", *params)

    def token(self, user: str, admin: bool = False) -> str:
        now = dt.datetime.now(dt.timezone.utc)
        return jwt.encode({"sub": user, "role": "admin" if admin else "user", "iat": now,
                           "exp": now + dt.timedelta(hours=2)}, self.secret, algorithm="HS256")

    def due(self) -> int:
        """Outbox rows due and not done: the follow-up work still to do."""
        # Waiting and in flight counted apart, each on its own index (ix_outbox_due,
        # ix_outbox_in_flight): the poll must not scan the whole outbox while it is timed.
        return self.sql("SELECT (SELECT count(*) FROM outbox WHERE dispatched_at IS NULL AND "
                        "available_at <= now()) + (SELECT count(*) FROM outbox WHERE "
                        "completed_at IS NULL AND dispatched_at IS NOT NULL AND "
                        "dead_at IS NULL)")[0][0]

    @staticmethod
    def wait(cond, timeout: float, what: str, every: float = 0.1) -> float:
        start = time.monotonic()
        while not cond():
            if time.monotonic() - start > timeout:
                raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(every)
        return time.monotonic() - start

    def emails(self) -> list[tuple[float, str, str, str]]:
        """(arrival time, Message-ID, recipients, subject) of every email received so far."""
        if not self.mail_log.exists():
            return []
        return [tuple(line.split("\t")) for line in self.mail_log.read_text().splitlines()
                if line.count("\t") == 3]

    # -- data and load -------------------------------------------------------------------
    def seed(self, n: int) -> list[str]:
        """``n`` accounts with email addresses, default preferences, funded by one credit
        each (balance == ledger); written in SQL, so seeding sends no email."""
        users = f"(SELECT ({USER0} + g)::text AS uid FROM generate_series(0, {n - 1}) g) u"
        self.sql(f"""INSERT INTO accounts (user_id, email, balance_cents, currency, last_seq,
                         low_balance_threshold_cents, created_at, updated_at)
                     SELECT uid, 'u' || uid || '@bench.example', {SEED_CENTS}, 'USD', 1, 100,
                            now(), now() FROM {users}""")
        self.sql(f"""INSERT INTO transactions (user_id, seq, amount_cents, balance_after_cents,
                         type, status, description, reference, created_at)
                     SELECT uid, 1, {SEED_CENTS}, {SEED_CENTS}, 'credit', 'completed',
                            'Benchmark seed', 'seed-' || uid, now() FROM {users}""")
        self.sql("VACUUM ANALYZE")
        return [str(USER0 + i) for i in range(n)]

    def wrk(self, *, users: int, seconds: float, connections: int = 16, prefix: str,
            timeout_s: int = 300) -> dict:
        """Purchases as fast as ``connections`` connections go (scripts/benchkit/purchases.lua)."""
        env = dict(os.environ, BENCH_API_KEY=self.key, BENCH_ID_PREFIX=prefix,
                   BENCH_USER_LO=str(USER0), BENCH_USER_HI=str(USER0 + users - 1),
                   BENCH_TIMEOUT_S=str(timeout_s))
        out = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}",
                              f"-d{seconds:g}s", "--timeout", "10s", "-s", str(LUA), self.url],
                             env=env, capture_output=True, text=True, check=True).stdout
        m = re.search(r"^BENCH_RESULT (\{.*\})$", out, re.M)
        if not m:
            raise SystemExit("wrk printed no result:\n" + out)
        import json
        return json.loads(m.group(1))

    def purchases(self, users: list[str], *, rate: float, count: int, prefix: str,
                  threads: int = 16, timeout_s: int = 300) -> list[tuple[float, int, int]]:
        """``count`` purchases at a fixed offered ``rate`` (open loop: each has its start
        time), round robin over ``users``; returns (sent at, status, transaction id)."""
        start, lock, out = time.time() + 0.2, threading.Lock(), []
        seq = iter(range(count))

        def client() -> None:
            session = requests.Session()
            session.headers["X-API-Key"] = self.key
            while True:
                with lock:
                    i = next(seq, None)
                if i is None:
                    return
                delay = start + i / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                sent = time.time()
                try:
                    r = session.post(self.url + "/api/v1/verifications", timeout=30, json={
                        "id": f"{prefix}-{i}", "user_id": users[i % len(users)],
                        "service_name": "WhatsApp", "country": "US", "cost_cents": 1,
                        "timeout_seconds": timeout_s})
                    tx = r.json()["transaction"]["id"] if r.status_code == 201 else 0
                    status = r.status_code
                except requests.RequestException:
                    status, tx = 0, 0
                with lock:
                    out.append((sent, status, tx))

        workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return out


def pct(values: list[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of ``values``."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


class Sockets:
    """Authenticated /ws/balance sockets (websocket-client, a thread each); ``got`` maps a
    transaction id to when its ``balance_update`` arrived."""

    def __init__(self, stack: Stack, users: list[str]):
        import websocket
        self.got: dict[int, float] = {}
        self.snapshots = 0
        self.lock = threading.Lock()
        self.apps = []
        base = stack.url.replace("http", "ws", 1) + "/ws/balance?token="
        for user in users:
            app = websocket.WebSocketApp(base + stack.token(user), on_message=self._message)
            threading.Thread(target=app.run_forever, daemon=True).start()
            self.apps.append(app)
        Stack.wait(lambda: self.snapshots >= len(users), 120, f"{len(users)} sockets' snapshots")

    def _message(self, ws, text: str) -> None:
        at = time.time()
        import json
        msg = json.loads(text)
        with self.lock:
            if msg.get("type") == "snapshot":
                self.snapshots += 1
            elif msg.get("type") == "balance_update":
                self.got.setdefault(msg["transaction"]["id"], at)

    def close(self) -> None:
        for app in self.apps:
            app.close()


def common_args(parser) -> None:
    parser.add_argument("--doc", type=Path, default=None,
                        help="write the section into this file instead of docs/PERFORMANCE.md")


def cpu_table(rows: list[tuple[str, dict]], unit: str) -> str:
    """A markdown table of ms of CPU per ``unit`` by role, one row per run."""
    from benchkit.cpu import ROLES
    roles = [r for r in ROLES if any(c.get(r, 0) >= 0.005 for _, c in rows)]
    out = [f"| run | {' | '.join(roles)} | all roles | machine idle | steal | other processes |",
           "| --- |" + " ---: |" * (len(roles) + 4)]
    for name, c in rows:
        cells = [f"{c.get(r, 0):.2f}" for r in roles]
        total = sum(c.get(r, 0) for r in ROLES)
        out.append(f"| {name} | {' | '.join(cells)} | {total:.2f} | {c.get('idle_pct', 0):.0f}% "
                   f"| {c.get('steal_pct', 0):.0f}% | {c.get('other_pct', 0):.0f}% |")
    return (f"CPU per {unit} (ms), by process role, from /proc; *other processes* is the "
            "share of all CPUs used by everything else on the machine (interrupts "
            "included):\n\n" + "\n".join(out))
