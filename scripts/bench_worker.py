"""Worker benchmark: notification deliveries per second with one worker host, and the time to
refund 10,000 expired verifications.

One run (``scripts/bench_worker``, 3-5 minutes with the defaults, never more than
``--max-seconds``, 300; the runs share out the time left, and one that cannot finish in its
share is reported as incomplete with the rate of what it did):

1. creates a fresh database (``txmon_bench_worker``), migrates it with ``flask db upgrade``,
   starts an ephemeral redis-server on a free port (or uses ``--redis-url``, flushed first: give
   it a DB number nobody else uses) and an aiosmtpd sink on loopback in its own process (it
   counts the messages it accepts);
2. prepares the refund case: 2,500 funded accounts and 10,000 purchases through
   ``shared.ledger.charge_verification`` (timeout 10 s), 4 per account; all the outbox rows
   those purchases wrote (their expire countdowns, notifications, alert checks) are then
   marked dispatched and completed, so no countdown task exists and only the scan path can
   refund them;
3. references, on the same broker and sink: a no-op Celery task (same Celery settings as
   txmon's, its own queue; it only INCRs a Redis counter), drained by a worker of each
   concurrency; and a loop of ``shared.mail.send`` closing the connection after each message
   (connect, EHLO ... QUIT per message; the app itself keeps its connection open between
   messages) with 1 and nproc processes;
4. for each worker concurrency (the default = number of CPUs, and ``-c 4``): 2,000
   ``shared.ledger.record_credit`` calls on 2,000 accounts while no worker runs (each writes a
   ``credit_added`` notification and its outbox rows: delivery (push + email in one row; push
   and email rows written by older code are counted the same), balance update, alert
   check), then starts ``celery -A worker_service.celery_app worker --loglevel=WARNING`` and
   measures from its start until every push task and every email has completed (outbox
   ``completed_at``; email_status must be 'sent' for all); a delivery is one push or one email.
   The relay's dispatch (claims of up to 500 rows) is read back from ``dispatched_at``;
   ``--prequeued`` adds a diagnostic run whose outbox is drained into Redis beforehand;
5. refunds: starts a worker (the default concurrency; ``--refund-concurrency``), waits until it
   answers a ping, sets ``expires_at = now() - 1 s`` on the 10,000 pending verifications,
   sends ``txmon.refunds.scan_expired`` once and measures until all 10,000 are ``timed_out``;
   then checks the invariants (one refund transaction per verification, every account's
   balance = the sum of its ledger and last_seq = its number of transactions);
6. writes the numbers into docs/PERFORMANCE.md between ``<!-- bench:worker -->`` and
   ``<!-- /bench:worker -->`` (the block is appended when missing; nothing else in the file
   changes), stops everything it started and drops the database.

CPU use is sampled from /proc during every measurement and split into the worker (main
process / pool children), Postgres, Redis, the SMTP sink, this script and *other processes*,
since the machine may be shared. ``--help`` lists the knobs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import (CLK_TCK, admin_url, backend_database, busy_ticks, free_port,  # noqa: E402
                      proc_stat)

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
DOC = ROOT / "docs" / "PERFORMANCE.md"
HEADING = "## Worker: notification deliveries and timeout refunds"
OPEN, CLOSE = "<!-- bench:worker -->", "<!-- /bench:worker -->"
TARGET_DELIVERIES = 500.0
TARGET_REFUND_S = 30.0
PUSH = "txmon.notifications.deliver"  # push only (rows written by older code)
EMAIL = "txmon.email.send_notification"  # email only (idem)
DELIVER = "txmon.notifications.deliver_all"  # push + email of one notification: 2 deliveries
PUBLISH = "txmon.realtime.publish_balance"  # the relay publishes these itself
CHECK = "txmon.alerts.check_transaction"
NOOP_QUEUE = "bench_noop"
NOOP_COUNTER = "bench:noop:done"
SEED_BALANCE = 10**9
COST_CENTS = 10
CREDIT_CENTS = 500
KNOBS = ("CELERY_PREFETCH", "CELERY_VISIBILITY_TIMEOUT_S", "TXMON_DB_POOL_SIZE", "TXMON_RELAY")


# -- the no-op reference app (imported by its own worker: celery -A bench_worker:noop_app) -----

def make_noop_app(broker: str, conf: dict):
    """A Celery app with txmon's Celery settings and one task that only INCRs a counter; the
    increments that reach 1, 10 % and 90 % of ``n`` and ``n`` record their time."""
    from celery import Celery

    app = Celery("bench_noop", broker=broker, set_as_current=False)
    app.conf.update(conf, broker_url=broker, task_default_queue=NOOP_QUEUE)
    clients: dict[int, object] = {}

    @app.task(name="bench.noop", acks_late=True)
    def noop(n: int) -> None:
        r = clients.get(os.getpid())
        if r is None:
            import redis

            r = clients[os.getpid()] = redis.Redis.from_url(broker)
        done = r.incr(NOOP_COUNTER)
        if done in (1, max(1, n // 10), max(1, n * 9 // 10), n):
            r.set(f"{NOOP_COUNTER}:at:{done}", repr(time.time()))

    return app


if os.environ.get("BENCH_NOOP_BROKER"):
    noop_app = make_noop_app(os.environ["BENCH_NOOP_BROKER"],
                             json.loads(os.environ.get("BENCH_NOOP_CONF", "{}")))


# -- small helpers -----------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[bench_worker {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Deadline(Exception):
    """--max-seconds reached."""


def pg(url: str, wait: float = 60.0):
    """An autocommit connection; waits (up to ``wait`` s) while the server has no free
    connection slot (a shared server may be busy with someone else's load test)."""
    import psycopg

    deadline = time.monotonic() + wait
    while True:
        try:
            return psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            if "too many clients" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def q1(url: str, sql: str, params=None):
    with pg(url) as conn:
        return conn.execute(sql, params).fetchone()


def qall(url: str, sql: str, params=None) -> list:
    with pg(url) as conn:
        return conn.execute(sql, params).fetchall()


def rates(times: list[float], t0: float) -> dict:
    """Completion times (epoch s) -> count, time of the last from t0, the rate from t0, and the
    steady rate between the 10th and the 90th percentile completions."""
    times = sorted(times)
    n = len(times)
    out = {"n": n, "first_s": None, "last_s": None, "from_start": None, "steady": None}
    if not n:
        return out
    out["first_s"], out["last_s"] = times[0] - t0, times[-1] - t0
    out["from_start"] = n / max(1e-9, times[-1] - t0)
    i10, i90 = int(0.1 * n), int(0.9 * n) - 1
    if i90 > i10 and times[i90] > times[i10]:
        out["steady"] = (i90 - i10) / (times[i90] - times[i10])
    return out


# -- processes we start ------------------------------------------------------------------------

class Proc:
    """A child process in its own session (so its whole tree can be stopped by its id)."""

    def __init__(self, name: str, cmd: list[str], env: dict, logdir: Path, **kw):
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self.log_file = open(self.log_path, "ab")
        self.popen = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.log_file,
                                      stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        # Whatever is left of its tree (pool children of a worker we had to kill).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self.log_file.close()

    def tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class SmtpSink:
    """aiosmtpd on loopback in its own process; counts the messages it accepts."""

    def __init__(self, logdir: Path):
        self.port = free_port()
        self.popen = subprocess.Popen(
            [sys.executable, __file__, "_smtp_sink", str(self.port)], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(logdir / "smtp.log", "ab"),
            text=True, start_new_session=True)
        self.pid = self.popen.pid
        if self.popen.stdout.readline().strip() != "ready":
            raise RuntimeError("the SMTP sink did not start (see smtp.log)")

    def count(self) -> int:
        self.popen.stdin.write("count\n")
        self.popen.stdin.flush()
        return int(self.popen.stdout.readline())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.popen.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(5)


def smtp_sink_main(port: int) -> None:
    from aiosmtpd.controller import Controller

    class Handler:
        count = 0

        async def handle_DATA(self, server, session, envelope):
            Handler.count += 1
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "count":
                print(Handler.count, flush=True)
    finally:
        controller.stop()


# -- CPU accounting ----------------------------------------------------------------------------

ROLES = ("worker_main", "worker_pool", "postgres", "redis", "smtp_sink", "bench", "irq", "other")


class CpuSampler(threading.Thread):
    """CPU time used during a window, by role, sampled from /proc every 0.25 s: the worker's
    main process (consumer, relay threads) and its pool children; Postgres (server processes
    and backends of the bench database); Redis (ours, or any redis-server when shared); the
    SMTP sink; this script (and its children); interrupts/steal; everything else (other users
    of a shared machine). A process that exits between two samples loses its last 0.25 s."""

    def __init__(self, *, dbname: str, worker_pid: int | None, redis_pid: int | None,
                 smtp_pid: int | None):
        super().__init__(daemon=True)
        self.dbname, self.worker_pid = dbname, worker_pid
        self.redis_pid, self.smtp_pid, self.me = redis_pid, smtp_pid, os.getpid()
        self.first: dict[int, int] = {}
        self.last: dict[int, tuple[str, int]] = {}
        self.cmdline: dict[int, str] = {}
        self.done = threading.Event()

    def _role(self, pid: int, comm: str, ppid: int) -> str:
        if self.worker_pid is not None:
            if pid == self.worker_pid:
                return "worker_main"
            if ppid == self.worker_pid:
                return "worker_pool"
        if pid == self.smtp_pid:
            return "smtp_sink"
        if pid == self.redis_pid or (self.redis_pid is None and comm == "redis-server"):
            return "redis"
        if pid == self.me or ppid == self.me:
            return "bench"
        if comm == "postgres":
            database = backend_database(pid, self.cmdline)
            if database is None or database == self.dbname:
                return "postgres"
        return "other"

    def sample(self, first: bool = False) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                comm, ppid, ticks = proc_stat(entry.name)
            except (OSError, ValueError, IndexError):
                continue
            pid = int(entry.name)
            if first:
                self.first[pid] = ticks
            self.last[pid] = (self._role(pid, comm, ppid), ticks)

    def run(self) -> None:
        while not self.done.wait(0.25):
            self.sample()

    def __enter__(self):
        (self.busy0, self.irq0), self.wall0 = busy_ticks(), time.monotonic()
        self.sample(first=True)
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def stop(self) -> dict:
        if getattr(self, "result", None) is not None:
            return self.result
        self.done.set()
        self.join()
        self.sample()
        wall = max(1e-9, time.monotonic() - self.wall0)
        used = {r: 0 for r in ROLES if r not in ("irq", "other")}
        for pid, (role, ticks) in self.last.items():
            if role in used:
                used[role] += ticks - self.first.get(pid, 0)
        busy, irq = busy_ticks()
        busy, irq = busy - self.busy0, irq - self.irq0
        used["irq"] = irq
        used["other"] = max(0, busy - sum(used.values()))
        ncpu = os.cpu_count() or 1
        self.result = {
            "wall_s": wall,
            "cpu_s": {k: v / CLK_TCK for k, v in used.items()},
            "share_pct": {k: 100 * v / CLK_TCK / wall / ncpu for k, v in used.items()},
            "busy_pct": 100 * busy / CLK_TCK / wall / ncpu,
        }
        return self.result


_SMTP_LOOP: dict = {}


def _smtp_loop(seconds: float) -> int:
    """Send the prepared message with shared.mail.send for ``seconds``; returns how many.
    Module level, so multiprocessing (fork) children can run it."""
    from shared import mail

    sent, end = 0, time.monotonic() + seconds
    with _SMTP_LOOP["app"].app_context():
        while time.monotonic() < end:
            mail.send(_SMTP_LOOP["msg"])
            mail.close_connections()  # the reference: one connection per message
            sent += 1
    return sent


# -- the benchmark -----------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.procs: list = []
        self.work = Path(tempfile.mkdtemp(prefix="txmon-bench-worker-"))
        self.admin = admin_url()
        self.db_url = self.admin.split("?", 1)[0].rsplit("/", 1)[0] + "/" + args.db
        self.db_created = False
        self.redis_proc = None
        self.sink = None
        self.res: dict = {"phases": [], "noop": [], "smtp": [], "refunds": []}

    # -- lifecycle ----------------------------------------------------------------------------

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop()
        self.procs.clear()
        if self.args.redis_url and getattr(self, "redis", None) is not None:
            with contextlib.suppress(Exception):
                self.redis.flushdb()  # leave the borrowed DB number as empty as we found it
        if self.db_created and not self.args.keep:
            with contextlib.suppress(Exception):
                self.flask_app.extensions["sqlalchemy"].engine.dispose()
            for attempt in range(30):  # the server may be out of connections for a while
                try:
                    with pg(self.admin) as conn:
                        conn.execute(f'DROP DATABASE IF EXISTS "{self.args.db}" WITH (FORCE)')
                    log(f"dropped database {self.args.db}")
                    break
                except Exception as exc:
                    if attempt == 29:
                        log(f"could not drop database {self.args.db}: {exc}; drop it by hand")
                    time.sleep(1)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"kept {self.work} and database {self.args.db}")

    def start_services(self) -> None:
        # Redis: our own ephemeral server, or a dedicated DB number of an existing one.
        if self.args.redis_url:
            self.redis_url = self.args.redis_url
        else:
            server = shutil.which("redis-server")
            if not server:
                raise SystemExit("bench_worker: redis-server not found; pass --redis-url "
                                 "redis://HOST:PORT/N with a DB number nobody else uses")
            port = free_port()
            self.redis_proc = Proc("redis", [server, "--port", str(port), "--bind", "127.0.0.1",
                                             "--save", "", "--appendonly", "no",
                                             "--dir", str(self.work)], dict(os.environ), self.work)
            self.procs.append(self.redis_proc)
            self.redis_url = f"redis://127.0.0.1:{port}/0"
        import redis

        self.redis = redis.Redis.from_url(self.redis_url)
        for _ in range(50):
            with contextlib.suppress(redis.ConnectionError):
                self.redis.ping()
                break
            time.sleep(0.1)
        self.redis.flushdb()
        self.redis_version = self.redis.info("server").get("redis_version")
        self.sink = SmtpSink(self.work)
        self.procs.append(self.sink)
        self.smtp_url = f"smtp://127.0.0.1:{self.sink.port}"

        with pg(self.admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.args.db}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.args.db}"')
        self.db_created = True

        env = self.env()
        out = subprocess.run([str(VENV_BIN / "flask"), "--app", "api_service", "db", "upgrade"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError("migration failed:\n" + out.stdout + out.stderr)
        # This process uses the app too (ledger calls, send_task): same configuration.
        os.environ.update({k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        sys.path.insert(0, str(ROOT))
        import logging

        from worker_service.celery_app import celery, celery_config

        logging.getLogger().setLevel(logging.WARNING)  # create_app logs every movement at INFO
        self.celery = celery
        self.flask_app = celery.flask_app
        conf = celery_config(self.flask_app.config)
        for key in ("task_queues", "task_routes", "beat_schedule", "broker_url",
                    "task_default_queue"):
            conf.pop(key, None)
        for key in list(conf):  # the no-op worker gets them as JSON
            try:
                json.dumps(conf[key])
            except TypeError:
                conf.pop(key)
        self.noop_conf = conf
        self.noop = make_noop_app(self.redis_url, conf)

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.update(DATABASE_URL=self.db_url, REDIS_URL=self.redis_url,
                   CELERY_BROKER_URL=self.redis_url, SMTP_URL=self.smtp_url,
                   TXMON_WORKER_METRICS_PORT="0", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def sampler(self, worker_pid: int | None) -> CpuSampler:
        return CpuSampler(dbname=self.args.db, worker_pid=worker_pid,
                          redis_pid=self.redis_proc.pid if self.redis_proc else None,
                          smtp_pid=self.sink.pid)

    def quiet(self) -> None:
        """--wait-quiet: wait (within the time left) for the machine to be < 15 % busy."""
        if self.args.wait_quiet <= 0:
            return
        limit = min(self.args.wait_quiet, self.remaining() - 120)
        started, busy = time.monotonic(), None
        while True:
            b0, _ = busy_ticks()
            t = time.monotonic()
            time.sleep(2)
            busy = (100 * (busy_ticks()[0] - b0) / CLK_TCK / (time.monotonic() - t)
                    / (os.cpu_count() or 1))
            if busy < 15 or time.monotonic() - started > limit:
                break
        self.res.setdefault("quiet", []).append(busy)
        log(f"machine {busy:.0f}% busy after waiting {time.monotonic() - started:.0f} s")

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise Deadline()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    # -- data ---------------------------------------------------------------------------------

    def parallel(self, fn, items: list, threads: int = 4) -> float:
        """Run fn(item) for every item on ``threads`` threads, each in an app context."""
        def work(chunk):
            with self.flask_app.app_context():
                for item in chunk:
                    fn(item)
        started = time.monotonic()
        with ThreadPoolExecutor(threads) as ex:
            for f in [ex.submit(work, items[i::threads]) for i in range(threads)]:
                f.result()
        return time.monotonic() - started

    def seed_accounts(self) -> None:
        n, r = self.args.notifications, self.args.refund_accounts
        with pg(self.db_url) as conn, conn.transaction():
            conn.execute("""
                INSERT INTO accounts (user_id, email, balance_cents, currency, last_seq,
                                      low_balance_threshold_cents, created_at, updated_at)
                SELECT 'bwd-' || g, 'bwd-' || g || '@bench.txmon.test', 0, 'USD', 0, 100,
                       now(), now() FROM generate_series(1, %s) g""", (n,))
            conn.execute("""
                INSERT INTO accounts (user_id, email, balance_cents, currency, last_seq,
                                      low_balance_threshold_cents, created_at, updated_at)
                SELECT 'bwr-' || g, 'bwr-' || g || '@bench.txmon.test', %s, 'USD', 1, 100,
                       now(), now() FROM generate_series(1, %s) g""", (SEED_BALANCE, r))
            conn.execute("""
                INSERT INTO transactions (user_id, seq, amount_cents, balance_after_cents, type,
                                          status, description, reference, created_at)
                SELECT 'bwr-' || g, 1, %s, %s, 'credit', 'completed', 'Benchmark seed',
                       'bench-seed-' || g, now() FROM generate_series(1, %s) g""",
                         (SEED_BALANCE, SEED_BALANCE, r))

    def prepare_refund_set(self, tag: str) -> dict:
        """``--verifications`` pending purchases (timeout 10 s) through the ledger; their
        outbox rows marked dispatched and completed (no countdown task: scan path only)."""
        from shared import ledger

        n, accounts = self.args.verifications, self.args.refund_accounts
        prefix = f"bw-{tag}-"

        def charge(k: int) -> None:
            ledger.charge_verification(verification_id=f"{prefix}{k:06d}",
                                       user_id=f"bwr-{k % accounts + 1}", service_name="Telegram",
                                       country="US", cost_cents=COST_CENTS, timeout_seconds=10)
        log(f"refund set {tag}: {n:,} purchases through ledger.charge_verification ...")
        took = self.parallel(charge, list(range(n)))
        with pg(self.db_url) as conn:
            done = conn.execute("""UPDATE outbox SET dispatched_at = now(), completed_at = now(),
                                   attempts = 1 WHERE completed_at IS NULL""").rowcount
            pending = conn.execute("SELECT count(*) FROM verifications WHERE id LIKE %s AND "
                                   "status = 'pending'", (prefix + "%",)).fetchone()[0]
            conn.execute("VACUUM ANALYZE")
        assert pending == n, f"expected {n} pending verifications, found {pending}"
        log(f"refund set {tag}: {n:,} purchases in {took:.1f} s; {done:,} outbox rows "
            "marked completed (no countdown tasks)")
        return {"prefix": prefix, "n": n, "setup_s": took}

    # -- workers ------------------------------------------------------------------------------

    def start_worker(self, name: str, concurrency: int | None, prom_dir: Path) -> Proc:
        cmd = [str(VENV_BIN / "celery"), "-A", "worker_service.celery_app", "worker",
               "--loglevel=WARNING"]
        if concurrency:
            cmd += ["-c", str(concurrency)]
        prom_dir.mkdir(parents=True, exist_ok=True)
        p = Proc(name, cmd, self.env(PROMETHEUS_MULTIPROC_DIR=str(prom_dir)), self.work)
        self.procs.append(p)
        return p

    def stop_proc(self, p: Proc, grace: float = 5.0) -> None:
        """SIGTERM (Celery's warm shutdown), SIGKILL to its process group after ``grace`` s:
        the measurement is over and whatever it still holds is dropped with the database."""
        started = time.monotonic()
        p.stop(grace)
        log(f"stopped {p.name} in {time.monotonic() - started:.1f} s")
        if p in self.procs:
            self.procs.remove(p)

    def wait_ping(self, app, worker: Proc, timeout: float = 40) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not worker.alive():
                raise RuntimeError(f"{worker.name} exited:\n{worker.tail()}")
            if app.control.ping(timeout=0.5):
                return time.monotonic() - started
        raise RuntimeError(f"{worker.name} did not answer a ping in {timeout} s:\n{worker.tail()}")

    # -- references ---------------------------------------------------------------------------

    def noop_reference(self, label: str, concurrency: int | None) -> dict:
        n = self.args.noop_tasks
        self.redis.flushdb()
        started = time.monotonic()
        with self.noop.producer_or_acquire() as producer:
            for _ in range(n):
                self.noop.send_task("bench.noop", kwargs={"n": n}, queue=NOOP_QUEUE,
                                    producer=producer)
        publish_s = time.monotonic() - started
        cmd = [str(VENV_BIN / "celery"), "-A", "bench_worker:noop_app", "worker",
               "--loglevel=WARNING", "-Q", NOOP_QUEUE]
        if concurrency:
            cmd += ["-c", str(concurrency)]
        env = self.env(BENCH_NOOP_BROKER=self.redis_url, BENCH_NOOP_CONF=json.dumps(self.noop_conf),
                       PYTHONPATH=os.pathsep.join((str(ROOT / "scripts"), str(ROOT))))
        t0 = time.time()
        worker = Proc(f"noop-{label}", cmd, env, self.work)
        self.procs.append(worker)
        limit = min(30.0, self.remaining() - 150)
        cpu, base = None, 0  # CPU counted from the first task run on (not the worker's start)
        while True:
            got = int(self.redis.get(NOOP_COUNTER) or 0)
            if cpu is None and got > 0:
                cpu, base = self.sampler(worker.pid).__enter__(), got
            if got >= n or time.time() - t0 > limit:
                break
            if not worker.alive():
                raise RuntimeError(f"no-op worker exited:\n{worker.tail()}")
            time.sleep(0.05)
        if cpu is not None:
            cpu.stop()
        self.stop_proc(worker)
        done = int(self.redis.get(NOOP_COUNTER) or 0)

        def at(k):
            v = self.redis.get(f"{NOOP_COUNTER}:at:{k}")
            return float(v) if v else None
        first, t10, t90, last = at(1), at(max(1, n // 10)), at(max(1, n * 9 // 10)), at(n)
        out = {"label": label, "n": n, "done": done, "publish_per_s": n / publish_s,
               "first_s": first - t0 if first else None, "last_s": last - t0 if last else None,
               "from_start": n / (last - t0) if last else None,
               "steady": (t90 and t10 and t90 > t10 and (n * 9 // 10 - n // 10) / (t90 - t10))
               or None, "cpu": cpu.result if cpu else None, "cpu_items": got - base}
        self.redis.flushdb()
        log(f"no-op reference ({label}): {done:,}/{n:,} tasks, steady "
            f"{out['steady'] or 0:,.0f}/s, {out['from_start'] or 0:,.0f}/s from worker start")
        return out

    def smtp_reference(self) -> list[dict]:
        """shared.mail.send in a loop, one SMTP connection per message (the app reuses its
        connection; this reference keeps the per-message cost), with 1 process and with nproc
        processes, ``--smtp-seconds`` each."""
        import multiprocessing

        from shared import mail

        with self.flask_app.app_context():
            msg = mail.build(to="bwd-1@bench.txmon.test", subject="txmon: Credits Added",
                             context={"title": "Credits Added", "message": "$5.00 added to your "
                                      "account. New balance: $5.00", "wallet_url":
                                      "http://127.0.0.1:8000/wallet", "amount": "$5.00",
                                      "balance": "$5.00"})
        _SMTP_LOOP.update(app=self.flask_app, msg=msg)
        seconds = self.args.smtp_seconds
        out = []
        ctx = multiprocessing.get_context("fork")

        def default_signals():  # the pool's children must not run our SIGTERM handler
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
        for procs in sorted({1, os.cpu_count() or 1}):
            before = self.sink.count()
            with self.sampler(None) as cpu:
                if procs == 1:
                    sent = _smtp_loop(seconds)
                else:
                    with ctx.Pool(procs, initializer=default_signals) as pool:
                        sent = sum(pool.map(_smtp_loop, [seconds] * procs))
            received = self.sink.count() - before
            out.append({"procs": procs, "sent": sent, "received": received,
                        "per_s": sent / cpu.result["wall_s"], "cpu": cpu.result})
            log(f"smtp reference, {procs} process(es): {sent / cpu.result['wall_s']:,.0f} "
                f"messages/s ({received:,} received by the sink)")
        return out

    # -- deliveries ---------------------------------------------------------------------------

    def delivery_phase(self, label: str, concurrency: int | None, round_no: int,
                       prequeued: bool = False, budget_s: float = 1e9) -> dict:
        """``prequeued`` (a diagnostic): the outbox is drained into Redis by this process
        (worker_service.relay.drain, the relay's own code) before the worker starts, so the
        worker only consumes; its relay finds nothing to do."""
        from shared import ledger

        phase_end = time.monotonic() + budget_s
        n = self.args.notifications
        self.redis.flushdb()
        lo_n, lo_o = q1(self.db_url, "SELECT (SELECT coalesce(max(id), 0) FROM notifications), "
                                     "(SELECT coalesce(max(id), 0) FROM outbox)")

        def credit(i: int) -> None:
            ledger.record_credit(user_id=f"bwd-{i + 1}", amount_cents=CREDIT_CENTS,
                                 payment_id=f"bw-pay-{round_no}-{i}")
        log(f"deliveries ({label}): {n:,} credits through ledger.record_credit, no worker "
            "running ...")
        setup_s = self.parallel(credit, list(range(n)))
        hi_n, hi_o = q1(self.db_url, "SELECT (SELECT max(id) FROM notifications), "
                                     "(SELECT max(id) FROM outbox)")
        kinds = dict(qall(self.db_url, "SELECT task, count(*) FROM outbox WHERE id > %s AND "
                                       "id <= %s GROUP BY task", (lo_o, hi_o)))
        assert (kinds.get(PUSH, 0) + kinds.get(DELIVER, 0) == n
                and kinds.get(EMAIL, 0) + kinds.get(DELIVER, 0) == n), kinds
        total_rows = sum(kinds.values())
        log(f"deliveries ({label}): setup {setup_s:.1f} s; outbox rows waiting: {kinds}")
        with pg(self.db_url) as conn:
            conn.execute("VACUUM ANALYZE")
        self.check_deadline()
        prequeue_s = None
        if prequeued:
            from worker_service import relay

            started = time.monotonic()
            with self.flask_app.app_context():
                relay.drain(self.celery)
            prequeue_s = time.monotonic() - started
            log(f"deliveries ({label}): {total_rows:,} outbox rows dispatched to Redis by this "
                f"process in {prequeue_s:.1f} s ({total_rows / prequeue_s:,.0f} rows/s)")

        sink_before = self.sink.count()
        prom = self.work / f"prom-{label}-{round_no}"
        t0 = time.time()
        worker = self.start_worker(f"worker-{label}-{round_no}", concurrency, prom)
        limit = min(self.args.phase_timeout, phase_end - time.monotonic() - 6)
        deliveries_at = None
        last_log = time.monotonic()
        # CPU is counted from the first delivery on (the worker's start is not a delivery's
        # cost), over the deliveries made from then on.
        cpu, cpu_base, cpu_items, cpu_deliveries = None, 0, 0, None
        with pg(self.db_url) as conn:
            while True:
                push, email, allrows = conn.execute(
                    "SELECT count(*) FILTER (WHERE task IN (%s, %s)), count(*) FILTER (WHERE task "
                    "IN (%s, %s)), count(*) FROM outbox WHERE id > %s AND id <= %s AND "
                    "completed_at IS NOT NULL",
                    (PUSH, DELIVER, EMAIL, DELIVER, lo_o, hi_o)).fetchone()
                now = time.time()
                if cpu is None and push + email > 0:
                    cpu, cpu_base = self.sampler(worker.pid).__enter__(), push + email
                if deliveries_at is None and push >= n and email >= n:
                    deliveries_at = now
                    cpu_deliveries, cpu_items = cpu.stop(), push + email - cpu_base
                if allrows >= total_rows:
                    break
                if not worker.alive():
                    raise RuntimeError(f"worker exited:\n{worker.tail()}")
                if now - t0 > limit:
                    log(f"deliveries ({label}): stopped waiting after {limit:.0f} s")
                    break
                if time.monotonic() - last_log > 5:
                    last_log = time.monotonic()
                    log(f"  {now - t0:5.1f} s: push {push:,}/{n:,}, email {email:,}/{n:,}, "
                        f"all tasks {allrows:,}/{total_rows:,}")
                time.sleep(0.5 if cpu else 0.1)
        all_done_at = time.time() if allrows >= total_rows else None
        if deliveries_at is None and cpu is not None:
            cpu_deliveries, cpu_items = cpu.stop(), push + email - cpu_base
        metrics = read_metrics(prom)
        self.stop_proc(worker)
        sink = self.sink.count() - sink_before

        rows = qall(self.db_url, "SELECT task, extract(epoch FROM completed_at)::float8 FROM outbox"
                                 " WHERE id > %s AND id <= %s AND completed_at IS NOT NULL",
                    (lo_o, hi_o))
        by_task: dict[str, list[float]] = {}
        for task, at in rows:
            by_task.setdefault(task, []).append(at)
        statuses = dict(qall(self.db_url, "SELECT email_status, count(*) FROM notifications "
                                          "WHERE id > %s AND id <= %s GROUP BY 1", (lo_n, hi_n)))
        out = {
            "label": label, "concurrency": concurrency, "n": n, "setup_s": setup_s,
            "limit_s": limit,
            "prequeued": prequeued, "prequeue_s": prequeue_s, "kinds_total": total_rows,
            "relay": relay_stats(self.db_url, lo_o, hi_o, t0),
            "kinds": kinds, "t0": t0,
            "push": rates(by_task.get(PUSH, []) + by_task.get(DELIVER, []), t0),
            "email": rates(by_task.get(EMAIL, []) + by_task.get(DELIVER, []), t0),
            "combined": rates(by_task.get(PUSH, []) + by_task.get(EMAIL, [])
                              + 2 * by_task.get(DELIVER, []), t0),
            "all_tasks": rates([t for ts in by_task.values() for t in ts], t0),
            "deliveries_done_s": deliveries_at - t0 if deliveries_at else None,
            "all_done_s": all_done_at - t0 if all_done_at else None,
            "email_status": statuses, "sink_received": sink, "metrics": metrics,
            "cpu": cpu_deliveries, "cpu_items": cpu_items,
        }
        c = out["combined"]
        log(f"deliveries ({label}): {c['n']:,}/{2 * n:,} in {c['last_s'] or 0:.1f} s from worker "
            f"start = {c['from_start'] or 0:,.0f}/s; steady {c['steady'] or 0:,.0f}/s; "
            f"email_status {statuses}; sink got {sink:,}")
        return out

    # -- refunds ------------------------------------------------------------------------------

    def refund_phase(self, label: str, concurrency: int | None, refund_set: dict,
                     budget_s: float = 1e9) -> dict:
        phase_end = time.monotonic() + budget_s
        prefix, n = refund_set["prefix"], refund_set["n"]
        with pg(self.db_url) as conn:  # nothing else left for the worker to do
            conn.execute("UPDATE outbox SET dispatched_at = coalesce(dispatched_at, now()), "
                         "completed_at = now() WHERE completed_at IS NULL")
        self.redis.flushdb()
        prom = self.work / f"prom-refunds-{label}"
        worker = self.start_worker(f"worker-refunds-{label}", concurrency, prom)
        ready_s = self.wait_ping(self.celery, worker)
        time.sleep(1.0)  # let the relay's first drain and the pool settle
        lo_o = q1(self.db_url, "SELECT coalesce(max(id), 0) FROM outbox")[0]
        sink_before = self.sink.count()
        with pg(self.db_url) as conn:
            expired = conn.execute("UPDATE verifications SET expires_at = now() - interval "
                                   "'1 second' WHERE id LIKE %s AND status = 'pending'",
                                   (prefix + "%",)).rowcount
        assert expired == n, (expired, n)
        log(f"refunds ({label}): worker ready in {ready_s:.1f} s; {n:,} verifications expired; "
            "sending txmon.refunds.scan_expired")
        limit = min(self.args.phase_timeout, phase_end - time.monotonic() - 6)
        t0 = time.time()
        cpu = self.sampler(worker.pid).__enter__()
        self.celery.send_task("txmon.refunds.scan_expired")
        last_log = time.monotonic()
        with pg(self.db_url) as conn:
            while True:
                done = conn.execute("SELECT count(*) FROM verifications WHERE id LIKE %s AND "
                                    "status = 'timed_out'", (prefix + "%",)).fetchone()[0]
                now = time.time()
                if done >= n:
                    break
                if not worker.alive():
                    raise RuntimeError(f"worker exited:\n{worker.tail()}")
                if now - t0 > limit:
                    log(f"refunds ({label}): stopped waiting after {limit:.0f} s")
                    break
                if time.monotonic() - last_log > 5:
                    last_log = time.monotonic()
                    log(f"  {now - t0:5.1f} s: {done:,}/{n:,} timed_out")
                time.sleep(0.25)
        seen_done_s = time.time() - t0
        cpu_res = cpu.stop()
        notified = q1(self.db_url, """
            SELECT count(*) FILTER (WHERE task IN (%s, %s) AND completed_at IS NOT NULL),
                   count(*) FILTER (WHERE task IN (%s, %s) AND completed_at IS NOT NULL),
                   count(*) FILTER (WHERE task IN (%s, %s))
            FROM outbox WHERE id > %s""", (PUSH, DELIVER, EMAIL, DELIVER, PUSH, DELIVER, lo_o))
        drain = None
        if self.args.refund_drain > 0 and done >= n:
            drain = self.drain_refund_notifications(lo_o, t0, worker)
        metrics = read_metrics(prom)
        self.stop_proc(worker)
        sink = self.sink.count() - sink_before

        times = [r[0] for r in qall(self.db_url, """
            SELECT extract(epoch FROM created_at)::float8 FROM transactions
            WHERE type = 'verification_refund' AND verification_id LIKE %s""", (prefix + "%",))]
        hi_o = q1(self.db_url, "SELECT coalesce(max(id), 0) FROM outbox")[0]
        out = {"label": label, "concurrency": concurrency, "n": n, "timed_out": done,
               "limit_s": limit,
               "relay": relay_stats(self.db_url, lo_o, hi_o, t0),
               "ready_s": ready_s, "setup_s": refund_set["setup_s"],
               "refunds": rates(times, t0), "seen_done_s": seen_done_s,
               "notified_at_done": {"push": notified[0], "email": notified[1],
                                    "of": notified[2]},
               "drain": drain, "sink_received": sink, "metrics": metrics, "cpu": cpu_res,
               "invariants": self.invariants(prefix, n)}
        r = out["refunds"]
        log(f"refunds ({label}): {r['n']:,}/{n:,} refunded, last {r['last_s'] or 0:.1f} s after "
            f"the trigger ({r['from_start'] or 0:,.0f}/s); invariants "
            f"{'ok' if out['invariants']['ok'] else 'BROKEN'}")
        return out

    def drain_refund_notifications(self, lo_o: int, t0: float, worker: Proc) -> dict:
        limit = min(self.args.refund_drain, self.remaining() - 20)
        started = time.time()
        with pg(self.db_url) as conn:
            while True:
                left = conn.execute("SELECT count(*) FROM outbox WHERE id > %s AND completed_at "
                                    "IS NULL", (lo_o,)).fetchone()[0]
                if left == 0 or time.time() - started > limit or not worker.alive():
                    break
                time.sleep(0.5)
        return {"left": left, "done_s": time.time() - t0 if left == 0 else None,
                "waited_s": time.time() - started}

    def invariants(self, prefix: str, n: int) -> dict:
        with pg(self.db_url) as conn:
            refunds, distinct = conn.execute("""
                SELECT count(*), count(DISTINCT verification_id) FROM transactions
                WHERE type = 'verification_refund' AND verification_id LIKE %s""",
                                             (prefix + "%",)).fetchone()
            linked = conn.execute("""
                SELECT count(*) FROM verifications v JOIN transactions t
                  ON t.id = v.refund_transaction_id AND t.verification_id = v.id
                 AND t.type = 'verification_refund' AND t.amount_cents = v.cost_cents
                WHERE v.id LIKE %s AND v.status = 'timed_out'""", (prefix + "%",)).fetchone()[0]
            bad_ledger, accounts = conn.execute("""
                SELECT count(*) FILTER (WHERE a.balance_cents <> coalesce(t.s, 0)
                                          OR a.last_seq <> coalesce(t.c, 0)
                                          OR a.last_seq <> coalesce(t.m, 0)), count(*)
                FROM accounts a LEFT JOIN (SELECT user_id, sum(amount_cents) s, count(*) c,
                                                  max(seq) m FROM transactions GROUP BY user_id) t
                  USING (user_id)""").fetchone()
            refund_notes = conn.execute("""
                SELECT count(*) FROM notifications nt JOIN transactions t
                  ON t.id = nt.transaction_id WHERE t.type = 'verification_refund'
                 AND t.verification_id LIKE %s AND nt.type = 'instant_refund'""",
                                        (prefix + "%",)).fetchone()[0]
        # Exactly once: never two refunds for one verification, every refund linked and
        # notified, every ledger consistent (completeness is reported separately).
        ok = refunds == distinct == linked == refund_notes and bad_ledger == 0
        return {"ok": ok, "complete": refunds == n, "refund_transactions": refunds,
                "distinct_verifications": distinct,
                "linked": linked, "accounts": accounts, "accounts_off": bad_ledger,
                "refund_notifications": refund_notes}

    # -- facts --------------------------------------------------------------------------------

    def machine_facts(self) -> dict:
        cpu_model = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
        mem_kb = 0
        with contextlib.suppress(OSError, ValueError, IndexError):
            mem_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        with pg(self.db_url) as conn:
            pgf = {name: conn.execute(f"SHOW {name}").fetchone()[0]
                   for name in ("server_version", "synchronous_commit", "fsync",
                                "shared_buffers", "max_connections")}
        import celery
        import kombu

        git = {"commit": None, "dirty": []}
        with contextlib.suppress(Exception):
            git["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True).stdout.strip() or None
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=ROOT, capture_output=True, text=True).stdout
            git["dirty"] = [line[3:] for line in status.splitlines() if line.strip()]

        return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "mem_gib": mem_kb / 2**20,
                "kernel": platform.release(), "python": platform.python_version(),
                "loadavg": os.getloadavg(), "pg": pgf, "redis": self.redis_version,
                "redis_own": self.redis_proc is not None, "celery": celery.__version__,
                "kombu": kombu.__version__, "git": git,
                "knobs": {k: os.environ[k] for k in KNOBS if os.environ.get(k)}}


def read_metrics(prom_dir: Path) -> dict:
    """The worker's prometheus_client multiprocess files, summed across processes."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    out: dict = {"notifications": {}, "emails": {}, "task_runs": {}, "refund_latency": {}}
    if not prom_dir.exists():
        return out
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(prom_dir))
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "notifications_total":
                key = f"{s.labels.get('type')}/{s.labels.get('success')}"
                out["notifications"][key] = out["notifications"].get(key, 0) + s.value
            elif s.name == "emails_total":
                key = s.labels.get("result")
                out["emails"][key] = out["emails"].get(key, 0) + s.value
            elif s.name == "worker_task_runs_total":
                key = f"{s.labels.get('task')}/{s.labels.get('outcome')}"
                out["task_runs"][key] = out["task_runs"].get(key, 0) + s.value
            elif s.name == "refund_latency_seconds_bucket":
                le = s.labels.get("le")
                out["refund_latency"][le] = out["refund_latency"].get(le, 0) + s.value
            elif s.name in ("refund_latency_seconds_count", "refund_latency_seconds_sum"):
                out["refund_latency"][s.name.rsplit("_", 1)[1]] = s.value
    return out


def relay_stats(db_url: str, lo: int, hi: int, t0: float) -> dict:
    """How the outbox rows (lo, hi] were dispatched: the relay claims up to 500 rows per
    transaction and stamps them all with the time the claim began."""
    rows = qall(db_url, "SELECT extract(epoch FROM dispatched_at)::float8, count(*) FROM outbox "
                        "WHERE id > %s AND id <= %s AND dispatched_at IS NOT NULL "
                        "GROUP BY 1 ORDER BY 1", (lo, hi))
    out = {"rows": sum(c for _, c in rows), "batches": len(rows), "first_s": None,
           "last_s": None, "per_s": None}
    if rows:
        out["first_s"], out["last_s"] = rows[0][0] - t0, rows[-1][0] - t0
        if len(rows) > 1 and rows[-1][0] > rows[0][0]:
            out["per_s"] = sum(c for _, c in rows[:-1]) / (rows[-1][0] - rows[0][0])
    return out


def histogram_quantile(buckets: dict, q: float) -> str:
    """The upper bound of the bucket holding quantile q ("<= 5 s"), from cumulative buckets."""
    pairs = sorted(((float("inf") if k == "+Inf" else float(k)), v) for k, v in buckets.items()
                   if k not in ("count", "sum"))
    if not pairs or not pairs[-1][1]:
        return "-"
    total = pairs[-1][1]
    for bound, cum in pairs:
        if cum >= q * total:
            return "> 120 s" if bound == float("inf") else f"<= {bound:g} s"
    return "-"


# -- the document ------------------------------------------------------------------------------

def fmt_rate(v) -> str:
    return "-" if v is None else f"{v:,.0f}/s"


def fmt_s(v) -> str:
    return "-" if v is None else f"{v:.1f} s"


def cpu_row(name: str, cpu: dict, items: int, nproc: int) -> str:
    """One CPU table row; *ours* is every role but irq and other processes."""
    s = cpu["share_pct"]
    cores = cpu["cpu_s"]
    wall = cpu["wall_s"]
    cells = [f"{cores[r] / wall:.2f}" for r in ROLES]
    ours = sum(v for k, v in cores.items() if k not in ("irq", "other"))
    per = 1000 * ours / items if items else None
    return (f"| {name} | {wall:.1f} s | " + " | ".join(cells)
            + f" | {cpu['busy_pct']:.0f}% | {s['other']:.0f}% | {items:,} | "
            + (f"{per:.2f} | {nproc * 1000 / per:,.0f}/s |" if per else "- | - |"))


def conc_name(c, nproc) -> str:
    return f"default ({nproc} = nproc)" if c is None else f"-c {c}"


def render(res: dict, rerun: str) -> str:
    m, a = res["machine"], res["args"]
    nproc = m["nproc"]
    when = res["when"]
    L = []
    L.append(f"Measured {when} by `scripts/bench_worker` in {res['took_s']:.0f} s; the numbers "
             "in this section are from that run and are rewritten by the next one (only the "
             "text between the `bench:worker` markers). To rerun:")
    L.append("")
    L.append("```")
    L.append(rerun)
    L.append("```")
    L.append("")
    load = " ".join(f"{x:.2f}" for x in m["loadavg"])
    others = [p["cpu"]["share_pct"]["other"] for p in res["phases"] + res["refunds"]
              if p["cpu"]]
    quiet = res.get("quiet")
    L.append(
        f"- **Machine**: {nproc} CPUs ({m['cpu_model']}), {m['mem_gib']:.1f} GiB RAM, Linux "
        f"{m['kernel']}, Python {m['python']}, Celery {m['celery']} (kombu {m['kombu']}); "
        f"PostgreSQL {m['pg']['server_version']} (synchronous_commit="
        f"{m['pg']['synchronous_commit']}, fsync={m['pg']['fsync']}, shared_buffers="
        f"{m['pg']['shared_buffers']}), Redis {m['redis']} ("
        + ("an ephemeral redis-server started for this run" if m["redis_own"] else
           "a dedicated DB number of a shared server") + "), "
        "all on this machine. Load average at the start: "
        f"{load}. The machine may be shared: *other processes* took "
        + (f"{min(others):.0f}-{max(others):.0f}%" if others else "-")
        + " of the CPUs during the measurements (CPU table below)"
        + (f"; with `--wait-quiet` the machine was {min(quiet):.0f}-{max(quiet):.0f}% busy "
           "just before them" if quiet else "") + ".")
    g = m.get("git") or {}
    if g.get("commit"):
        L.append(f"- **Code**: commit `{g['commit']}`"
                 + (" plus uncommitted changes to " + ", ".join(f"`{f}`" for f in g["dirty"])
                    if g["dirty"] else " (no uncommitted changes to tracked files)") + ".")
    L.append(
        "- **Worker host**: `.venv/bin/celery -A worker_service.celery_app worker "
        "--loglevel=WARNING` (as scripts/run starts it, minus `-E`, which txmon's config turns on "
        "anyway: `worker_send_task_events`), prefork pool: "
        + ", ".join(dict.fromkeys(conc_name(p["concurrency"], nproc)
                                  for p in res["phases"] + res["refunds"]))
        + "; the outbox relay runs as thread(s) in its main process. "
        "Env: DATABASE_URL (the bench database), REDIS_URL (broker and pub/sub), SMTP_URL (the "
        "sink), TXMON_WORKER_METRICS_PORT=0, PROMETHEUS_MULTIPROC_DIR (fresh per worker; the "
        "metrics below are read from it)"
        + (", and " + ", ".join(f"{k}={v}" for k, v in m["knobs"].items()) if m["knobs"] else "")
        + ". No beat: the refund scan is sent once by hand.")
    L.append(
        "- **SMTP**: an aiosmtpd sink on 127.0.0.1 in its own process, accepting and counting "
        "every message (it stands in for a real relay and uses CPU on the same machine; its share "
        "is in the CPU table). The app keeps one SMTP connection open per worker process and "
        "sends message after message on it (shared/mail.py).")
    L.append("")

    L.append("### Results")
    L.append("")
    L.append("| measurement | result | target | met? |")
    L.append("| --- | ---: | ---: | --- |")
    for p in res["phases"]:
        if p.get("prequeued"):
            continue
        c = p["combined"]
        best = c["from_start"]
        met = best is not None and best >= TARGET_DELIVERIES and c["n"] == 2 * p["n"]
        L.append("| notification deliveries/s, one worker host, "
                 f"{conc_name(p['concurrency'], nproc)}"
                 f" (push + email, from worker start; steady state {fmt_rate(c['steady'])}) | "
                 f"**{fmt_rate(best)}** | >= {TARGET_DELIVERIES:.0f}/s | "
                 f"**{'met' if met else 'not met'}** |")
    for r in res["refunds"]:
        last = r["refunds"]["last_s"]
        met = last is not None and r["refunds"]["n"] == r["n"] and last <= TARGET_REFUND_S \
            and r["invariants"]["ok"]
        if r["refunds"]["n"] < r["n"]:
            last = None  # not all refunded: the time is "more than the run had"
        L.append(f"| time to refund {r['n']:,} expired verifications (scan path), "
                 f"{conc_name(r['concurrency'], nproc)} | **"
                 + (fmt_s(last) if last is not None else
                    f"> {r['limit_s']:.0f} s ({r['refunds']['n']:,} done)")
                 + f"** | <= "
                 f"{TARGET_REFUND_S:.0f} s | **{'met' if met else 'not met'}** |")
    for sk in res.get("skipped", []):
        L.append(f"| {sk} | not run: the time budget (`--max-seconds`) ran out | | |")
    L.append("")
    partial = [p for p in res["phases"] if p["combined"]["n"] < 2 * p["n"]] + \
        [r for r in res["refunds"] if r["refunds"]["n"] < r["n"]]
    if partial:
        L.append("**Incomplete runs**: " + "; ".join(
            (f"{conc_name(p['concurrency'], nproc)} deliveries: {p['combined']['n']:,} of "
             f"{2 * p['n']:,} in the {p['limit_s']:.0f} s it had (rates are over what was "
             "delivered)") if "combined" in p else
            (f"{conc_name(p['concurrency'], nproc)} refunds: {p['refunds']['n']:,} of "
             f"{p['n']:,} in the {p['limit_s']:.0f} s it had") for p in partial)
            + ". Fewer notifications (`--notifications`) or more time (`--max-seconds`, "
            "`--phase-timeout`) complete them.")
        L.append("")
    costs = [(f"delivery ({conc_name(p['concurrency'], nproc)})", p["cpu"], p["cpu_items"])
             for p in res["phases"] if not p.get("prequeued") and p["cpu"]]
    costs += [(f"refund ({conc_name(r['concurrency'], nproc)})", r["cpu"], r["refunds"]["n"])
              for r in res["refunds"]]
    costs = [(name, 1000 * sum(v for k, v in cpu["cpu_s"].items() if k not in ("irq", "other"))
              / n) for name, cpu, n in costs if n]
    if costs:
        L.append("CPU cost, all of this benchmark's processes together (worker, Postgres, Redis, "
                 "SMTP sink; see the CPU section): "
                 + "; ".join(f"{ms:.1f} ms per {name}, so at most ~{nproc * 1000 / ms:,.0f}/s on "
                             f"{nproc} CPUs nobody else uses" for name, ms in costs)
                 + ". That bound is an estimate (CPU only, no waits); it says whether the target "
                 "is within reach of this hardware at all.")
        L.append("")
    noop_best = max((r["steady"] or 0 for r in res["noop"]), default=0)
    if noop_best and res["phases"]:
        p0 = res["phases"][0]
        rows_per = sum(p0["kinds"].get(t, 0) for t in (PUSH, EMAIL, CHECK, DELIVER)) / (2 * p0["n"])
        batches = sum(v for k, v in p0["metrics"]["task_runs"].items()
                      if k.startswith("txmon.outbox.run_batch/"))
        L.append(f"Celery's own ceiling: a delivery costs {rows_per:g} outbox "
                 f"row{'' if rows_per == 1 else 's'} (one push + "
                 "email row per notification and its alert check: half a row each per delivery),"
                 f" and this host drained at most {noop_best:,.0f} no-op tasks/s (steady, best "
                 "concurrency; the prefork main process, which receives, acknowledges and reports"
                 " every task, is the busy one): one Celery task per row would allow "
                 f"~{noop_best / rows_per:,.0f} deliveries/s even if the tasks did nothing. The "
                 "relay therefore packs rows that are due together into `txmon.outbox.run_batch` "
                 f"tasks (up to 20 rows each, per queue): the first delivery run took {batches:,.0f}"
                 f" such tasks for its {sum(p0['kinds'].values()) - p0['kinds'].get(PUBLISH, 0):,}"
                 " task rows.")
        L.append("")
    L.append("Both are measured on a worker host that does everything a production one does at "
             "the same time: every credit also queues an alert check and publishes a balance "
             "update, every refund writes its own notification (push + email) and alert check, "
             "and all of it competes for the same pool.")
    L.append("")

    L.append("### Notification deliveries")
    L.append("")
    L.append(f"{a['notifications']:,} `credit_added` notifications per worker configuration, "
             "written through `shared.ledger.record_credit` (one per account, default "
             "preferences: push and email both wanted) while no worker ran, so "
             + (f"{a['notifications']:,} x 3 outbox rows were waiting: delivery (push and email "
                "in one `txmon.notifications.deliver_all` task, which counts as two deliveries), "
                if DELIVER in res["phases"][0]["kinds"] else
                f"{a['notifications']:,} x 4 outbox rows were waiting: push, email, ")
             + "balance update "
             "(the relay publishes it itself) and alert check. The clock starts when the worker "
             "process is started (its boot, the relay's first drain and the pool start are "
             "included) and a delivery counts when its task has completed (outbox "
             "`completed_at`; an email also only when its `email_status` is `sent`). *Steady* "
             "is the rate between the 10th and the 90th percentile completion. *Relay*: the "
             "worker's outbox relay claims up to 500 rows per transaction and stamps "
             "them with the claim's start; *last claim began* is when it started on the last "
             "of them (measured from worker start) and *rows/s* its dispatch rate up to then."
             + (" The *pre-queued* run is a diagnostic: the same relay code "
                "(`worker_service.relay.drain`) ran in the benchmark process before the worker "
                "started, so the worker only consumed; its relay column is that drain's rate."
                if any(p.get("prequeued") for p in res["phases"]) else ""))
    L.append("")
    L.append("| worker | push/s | email/s | deliveries/s (push + email) | steady | "
             "first delivery | last delivery | alert checks done | relay: last claim began | "
             "relay rows/s | email_status | sink received | notifications_total |")
    L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | "
             "---: |")
    for p in res["phases"]:
        nt = sum(v for k, v in p["metrics"]["notifications"].items() if k.endswith("/true"))
        st = ", ".join(f"{k} {v:,}" for k, v in sorted(p["email_status"].items()))
        rl = p["relay"]
        relay_cells = (f"{fmt_s(rl['last_s'])} ({rl['batches']} claims) | {fmt_rate(rl['per_s'])}"
                       if not p.get("prequeued") else
                       f"before start | {fmt_rate(p['kinds_total'] / p['prequeue_s'])}")
        name = conc_name(p["concurrency"], nproc) + (
            ", tasks pre-queued (diagnostic)" if p.get("prequeued") else "")
        L.append(f"| {name} | {fmt_rate(p['push']['from_start'])} | "
                 f"{fmt_rate(p['email']['from_start'])} | {fmt_rate(p['combined']['from_start'])} |"
                 f" {fmt_rate(p['combined']['steady'])} | {fmt_s(p['combined']['first_s'])} | "
                 f"{fmt_s(p['combined']['last_s'])} | {fmt_s(p['all_done_s'])} | {relay_cells} | "
                 f"{st} | "
                 f"{p['sink_received']:,} | {nt:,.0f} |")
    L.append("")
    L.append("Ceilings on the same machine, broker and sink:")
    L.append("")
    L.append("| reference | rate |")
    L.append("| --- | ---: |")
    for r in res["noop"]:
        L.append(f"| no-op Celery task, worker {conc_name(r['concurrency'], nproc)}: "
                 f"{r['n']:,} queued, then drained (steady; from worker start) | "
                 f"{fmt_rate(r['steady'])}; {fmt_rate(r['from_start'])} |")
    for s in res["smtp"]:
        L.append(f"| `shared.mail.send` loop (connect, EHLO, MAIL, RCPT, DATA, QUIT per message),"
                 f" {s['procs']} process{'es' if s['procs'] > 1 else ''} | {fmt_rate(s['per_s'])}"
                 f" |")
    L.append("")
    L.append("The no-op task has txmon's Celery settings (acks_late, prefetch multiplier 4, task "
             "events on, JSON) and its own queue; it only INCRs a Redis counter. Its rate is "
             "the most a worker host of that size moves through this broker with nothing to "
             "do; txmon's rows travel up to 20 to such a task (`txmon.outbox.run_batch`), "
             "so this ceiling is shared by many deliveries.")
    L.append("")

    L.append("### Refunds of expired verifications")
    L.append("")
    for r in res["refunds"]:
        inv = r["invariants"]
        rr = r["refunds"]
        lat = r["metrics"]["refund_latency"]
        na = r["notified_at_done"]
        L.append(
            f"{r['n']:,} pending verifications on {a['refund_accounts']:,} accounts "
            f"({r['n'] / a['refund_accounts']:g} each), "
            f"bought through `shared.ledger.charge_verification` with timeout 10 s before any "
            f"worker ran ({r['setup_s']:.0f} s); every outbox row of those purchases (their "
            "`expire_verification` countdowns included) was then marked dispatched and "
            "completed, so **only the scan path refunds** (no countdown task exists). With the "
            f"worker ({conc_name(r['concurrency'], nproc)}) up and idle (it answered a ping "
            f"{r['ready_s']:.1f} s after start), `expires_at` was set to `now() - 1 s` on all of "
            "them and `txmon.refunds.scan_expired` sent once; it queues `expire_batch` tasks of "
            "200 ids.")
        L.append("")
        L.append(f"- first refund committed {fmt_s(rr['first_s'])} after the trigger, the last "
                 f"**{fmt_s(rr['last_s'])}** after it ({rr['n']:,} of {r['n']:,}; "
                 f"{fmt_rate(rr['from_start'])} over the whole run, steady "
                 f"{fmt_rate(rr['steady'])}). In production beat sends the scan every 10 s, "
                 "so add up to 10 s to the time from expiry.")
        if lat.get("count"):
            L.append(f"- `refund_latency_seconds` (expiry -> refund commit; expiry was 1 s before "
                     f"the trigger): {lat['count']:,.0f} observations, mean "
                     f"{lat['sum'] / lat['count']:.1f} s, median {histogram_quantile(lat, 0.5)},"
                     f" p99 {histogram_quantile(lat, 0.99)}.")
        L.append(f"- invariants **{'hold' if inv['ok'] else 'BROKEN'}** (at most one refund "
                 "per verification, each linked and notified, every ledger consistent"
                 + ("" if inv.get("complete") else "; not every verification was refunded in "
                    "the time the run had") + "): "
                 f"{inv['refund_transactions']:,} `verification_refund` transactions for "
                 f"{inv['distinct_verifications']:,} distinct verifications, {inv['linked']:,} "
                 f"`timed_out` verifications linked to their refund of the right amount, "
                 f"{inv['refund_notifications']:,} `instant_refund` notifications; balance = "
                 f"sum of ledger and last_seq = count = max(seq) on all {inv['accounts']:,} "
                 f"accounts ({inv['accounts_off']} off).")
        drain = r["drain"]
        rl = r["relay"]
        L.append(f"- the refunds' own work competes for the same worker: the relay (main "
                 f"process) dispatched their outbox rows at {fmt_rate(rl['per_s'])} "
                 f"({rl['rows']:,} rows by the end), and when the last refund was seen "
                 f"{na['push']:,} pushes and {na['email']:,} emails of the {na['of']:,} refund "
                 "notifications had been delivered (the pool ran the refund batches first)"
                 + (f"; all their tasks were done {fmt_s(drain['done_s'])} after the trigger"
                    if drain and drain["done_s"] else
                    (f"; {drain['left']:,} of their tasks were still waiting after another "
                     f"{drain['waited_s']:.0f} s" if drain else "")) + ".")
        L.append("")

    L.append("### CPU")
    L.append("")
    L.append("Cores busy on average (CPU seconds / wall seconds) per role during each "
             "measurement, from /proc samples every 0.25 s: the worker's main process (consumer, "
             "outbox relay threads) and its pool children, Postgres (server processes and this "
             "database's backends), Redis, the SMTP sink, this script (its progress queries; the "
             "smtplib loops), *irq* (interrupts and steal, charged to no process) and *other* "
             f"(everything else: other users of the machine). {nproc} cores in all. *CPU ms "
             "per item, ours* is the CPU time of everything this benchmark runs (all roles but "
             "irq and other) per delivery, refund, task or message; "
             f"*{nproc} CPUs / that* is the rate the whole machine would allow if it were CPU "
             "alone that limited it and nobody else used the machine: an estimate for a quiet "
             "machine, not a measurement (it ignores waits: fsync, round trips).")
    L.append("")
    L.append("| window | wall | worker main | worker pool | Postgres | Redis | SMTP sink | "
             "bench | irq | other | machine busy | other, share | items | CPU ms per item, ours "
             f"| {nproc} CPUs / that |")
    L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: | ---: |")
    for p in [p for p in res["phases"] if p["cpu"]]:
        L.append(cpu_row(f"deliveries, {conc_name(p['concurrency'], nproc)}"
                         + (", pre-queued" if p.get("prequeued") else "")
                         + " (first -> last delivery; items: deliveries)", p["cpu"],
                         p["cpu_items"], nproc))
    for r in res["refunds"]:
        L.append(cpu_row(f"refunds, {conc_name(r['concurrency'], nproc)} (trigger -> all "
                         "refunded; items: refunds)", r["cpu"], r["refunds"]["n"], nproc))
    for r in res["noop"]:
        if r["cpu"]:
            L.append(cpu_row(f"no-op tasks, {conc_name(r['concurrency'], nproc)} (first -> "
                             "last task)", r["cpu"], r["cpu_items"], nproc))
    for s in res["smtp"]:
        L.append(cpu_row(f"smtplib loop, {s['procs']} process(es) (items: messages)", s["cpu"],
                         s["sent"], nproc))
    L.append("")
    L.append("The same, as CPU milliseconds per item and role:")
    L.append("")
    L.append("| window | worker main | worker pool | Postgres | Redis | SMTP sink | all of ours |")
    L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    per_item = [(f"per delivery, {conc_name(p['concurrency'], nproc)}"
                 + (", pre-queued" if p.get("prequeued") else ""), p["cpu"], p["cpu_items"])
                for p in res["phases"] if p["cpu"]]
    per_item += [(f"per refund, {conc_name(r['concurrency'], nproc)}", r["cpu"],
                  r["refunds"]["n"]) for r in res["refunds"]]
    per_item += [(f"per no-op task, {conc_name(r['concurrency'], nproc)}", r["cpu"],
                  r["cpu_items"]) for r in res["noop"] if r["cpu"]]
    for name, cpu, n in per_item:
        if not n:
            continue
        c = cpu["cpu_s"]
        ours = sum(v for k, v in c.items() if k not in ("irq", "other"))
        L.append(f"| {name} | " + " | ".join(
            f"{1000 * c[k] / n:.2f}" for k in ("worker_main", "worker_pool", "postgres", "redis",
                                                "smtp_sink")) + f" | {1000 * ours / n:.2f} |")
    L.append("")
    tr = {}
    for p in res["phases"] + res["refunds"]:
        for k, v in p["metrics"]["task_runs"].items():
            tr[k] = tr.get(k, 0) + v
    L.append("Task runs recorded by the workers (`worker_task_runs_total`, all windows): "
             + ", ".join(f"`{k}` {v:,.0f}" for k, v in sorted(tr.items())) + ".")
    return "\n".join(L)


def write_doc(body: str) -> None:
    """Replace the text between the markers (append heading + block when missing); every other
    byte of the file stays as it is."""
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    i = text.find(OPEN)
    j = text.find(CLOSE, i + len(OPEN)) if i >= 0 else -1
    if i >= 0 and j < 0:
        raise SystemExit(f"bench_worker: {DOC} has {OPEN} but no {CLOSE}; fix the file by hand")
    if i >= 0:
        new = text[:i + len(OPEN)] + "\n" + body.strip("\n") + "\n" + text[j:]
    else:
        new = (text.rstrip("\n") + "\n\n" + HEADING + "\n\n" + OPEN + "\n" + body.strip("\n")
               + "\n" + CLOSE + "\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_name(DOC.name + ".bench_worker.tmp")
    tmp.write_text(new)
    os.replace(tmp, DOC)


# -- main --------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/bench_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--notifications", type=int, default=2000,
                   help="credit notifications per worker configuration (2000: 4,000 "
                        "deliveries; more need a longer --max-seconds on a slow machine)")
    p.add_argument("--verifications", type=int, default=10000,
                   help="expired verifications to refund (10000)")
    p.add_argument("--refund-accounts", type=int, default=2500,
                   help="accounts the verifications are spread over (2500: 4 each, so no "
                        "rapid-transaction alert fires)")
    p.add_argument("--concurrency", default="default,4",
                   help="worker concurrencies for the delivery runs, comma-separated; 'default' "
                        "= no -c flag = nproc (default,4)")
    p.add_argument("--refund-concurrency", default="default",
                   help="worker concurrencies for the refund runs, comma-separated; each needs "
                        "its own --verifications purchases (default)")
    p.add_argument("--noop-tasks", type=int, default=3000, help="no-op reference tasks (3000)")
    p.add_argument("--smtp-seconds", type=float, default=2, help="per smtplib reference loop (2)")
    p.add_argument("--refund-drain", type=float, default=0, metavar="S",
                   help="after the refunds, wait up to S s for their notifications (0: only "
                        "report how far they got)")
    p.add_argument("--phase-timeout", type=float, default=100,
                   help="longest wait for one delivery or refund run (100 s); the runs also "
                        "share what is left of --max-seconds")
    p.add_argument("--max-seconds", type=float, default=300,
                   help="hard limit for the whole run; everything is stopped then (300)")
    p.add_argument("--prequeued", action="store_true",
                   help="diagnostic: one more delivery run (first concurrency) with the outbox "
                        "drained into Redis by this process before the worker starts, so the "
                        "worker only consumes (shows what the in-worker relay costs)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="before each measurement wait up to S s for the machine to be less than "
                        "15%% busy (shared machines; counts against --max-seconds)")
    p.add_argument("--redis-url", help="use this Redis (give a DB number nobody else uses: it is "
                                       "flushed) instead of starting redis-server")
    p.add_argument("--db", default="txmon_bench_worker", help="database to create and drop")
    p.add_argument("--no-doc", action="store_true", help="print results, leave the doc alone")
    p.add_argument("--keep", action="store_true", help="keep the database and work files")
    return p.parse_args(argv)


def concurrencies(spec: str) -> list[int | None]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            out.append(None if part == "default" else int(part))
    return out


def main(argv) -> int:
    if argv[:1] == ["_smtp_sink"]:
        smtp_sink_main(int(argv[1]))
        return 0
    args = parse_args(argv)
    # One run per database name at a time (a second one would drop the first one's database):
    # a session advisory lock on the server, held by this connection until the process ends.
    lock_conn = pg(admin_url())
    if not lock_conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                             (f"txmon bench_worker {args.db}",)).fetchone()[0]:
        print(f"bench_worker: another run uses database {args.db}; wait for it or pass --db",
              file=sys.stderr)
        return 1
    deliveries = concurrencies(args.concurrency)
    refund_runs = concurrencies(args.refund_concurrency)
    bench = Bench(args)
    started = time.monotonic()
    bench.deadline = started + args.max_seconds - 15  # leave time to stop and drop

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(_signum, _frame):
        raise Deadline()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.max_seconds - 8))
    status = 0
    try:
        log(f"work dir {bench.work}; database {args.db}")
        bench.start_services()
        res = bench.res
        res["machine"] = bench.machine_facts()
        res["when"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        res["args"] = vars(args)
        log(f"redis {bench.redis_url}, smtp sink {bench.smtp_url}, load average "
            f"{res['machine']['loadavg']}")
        bench.seed_accounts()
        refund_sets = [bench.prepare_refund_set(f"r{i}") for i in range(len(refund_runs))]
        res["skipped"] = []
        name = lambda c: "default" if c is None else f"c{c}"  # noqa: E731
        refund_need = (min(args.phase_timeout, 75) + 20) * len(refund_runs)
        for c in deliveries:
            if bench.remaining() < refund_need + 45 * (len(deliveries) + args.prequeued) + 15:
                res["skipped"].append(f"no-op reference, {name(c)}")
                continue
            bench.quiet()
            r = bench.noop_reference(name(c), c)
            r["concurrency"] = c
            res["noop"].append(r)
        res["smtp"] = bench.smtp_reference()
        # The rest of the time is shared out: the refund runs keep what they need, the
        # delivery runs split the remainder (a run that cannot finish in its share is
        # reported with what it delivered in it).
        runs = [(name(c), c, False) for c in deliveries]
        if args.prequeued and deliveries:
            runs.append(("prequeued-" + name(deliveries[0]), deliveries[0], True))
        for k, (label, c, pre) in enumerate(runs):
            bench.quiet()
            budget = (bench.remaining() - refund_need) / (len(runs) - k)
            if budget < 25:
                res["skipped"].append(f"deliveries, {label}")
                log(f"deliveries ({label}): skipped, {budget:.0f} s left for it")
                continue
            res["phases"].append(bench.delivery_phase(label, c, k, prequeued=pre,
                                                      budget_s=budget))
        for j, (c, rs) in enumerate(zip(refund_runs, refund_sets)):
            bench.quiet()
            budget = bench.remaining() / (len(refund_runs) - j)
            if budget < 25:
                res["skipped"].append(f"refunds, {name(c)}")
                log(f"refunds ({name(c)}): skipped, {budget:.0f} s left for it")
                continue
            res["refunds"].append(bench.refund_phase(name(c), c, rs, budget_s=budget))
        res["took_s"] = time.monotonic() - started
        rerun = "scripts/bench_worker" + "".join(f" {a}" for a in argv if a not in ("--no-doc",))
        body = render(res, rerun)
        if args.no_doc:
            print(body)
        else:
            write_doc(body)
            log(f"wrote the {OPEN} section of {DOC.relative_to(ROOT)}")
        if any(not r["invariants"]["ok"] for r in res["refunds"]):
            status = 1
    except Deadline:
        log(f"--max-seconds ({args.max_seconds:.0f}) reached; stopping without writing the doc")
        status = 2
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); stopping")
        status = 130
    finally:
        signal.alarm(0)
        bench.cleanup()
        lock_conn.close()
        log(f"done in {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
