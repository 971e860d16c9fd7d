"""Write-path benchmark: the API's POST /api/v1/verifications against the database's own rate.

One run (``scripts/bench_write``, about 4 minutes with the defaults):

1. creates a fresh database (``txmon_bench``), migrates it with ``flask db upgrade`` and seeds
   1,000 accounts (user ids 1000001..1001000) plus one hot account (2000000), each with a big
   balance written as a seed credit (so the ledger reconciles);
2. captures the exact statements one real request executes (in-process, by wrapping
   psycopg's cursor, so SQLAlchemy or raw psycopg alike; values and RETURNING rows too) and
   turns them into a pgbench script: same statement text, same order, the same transaction,
   the same round trips (statements sent as one message, psycopg pipelines, executemany:
   pgbench pipelines), RETURNING values fed to later
   statements with ``\\gset``;
3. serves the API exactly as gunicorn.conf.py configures it (defaults unless TXMON_WEB_* are
   given) and loads it with wrk (scripts/bench/verifications.lua: unique verification ids)
   over (a) random users of the 1,000 and (b) the one hot account;
4. runs pgbench -M prepared with the generated script, for both cases, at a few client counts;
5. writes the numbers, their ratio and the targets into docs/PERFORMANCE.md (its
   "## Write path: POST /api/v1/verifications" section only), stops the server and drops the
   database.

Every measurement is taken ``--rounds`` times (2), API and pgbench interleaved, and the best
of each is used, on both sides alike; each run also records how much CPU *other* processes
took, since the machine may be shared (``--wait-quiet S`` waits for a quiet moment first).
``--sweep`` also tries gunicorn settings (workers x threads x worker class x the API's
admission limit) and records which serves the most requests/s (about 11 more minutes). ``--help`` lists the knobs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import re
import runpy
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (CLK_TCK, admin_url, backend_database, busy_ticks, free_port,  # noqa: E402
                      proc_stat)

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "scripts" / "bench" / "verifications.lua"
DOC = ROOT / "docs" / "PERFORMANCE.md"
SECTION = "## Write path: POST /api/v1/verifications"
SWEEP_HEADING = "### gunicorn settings sweep"
RESULTS_HEADING = "### Results"
SQL_HEADING = "### The SQL measured"
USER_LO, USER_HI, HOT_USER = 1000001, 1001000, 2000000
SEED_BALANCE = 10**12
TARGETS = {"random": 0.25, "hot": 0.5}
CASE_NAMES = {"random": "random user of 1,000 accounts", "hot": "one hot account"}
GUNICORN_ENV = ("TXMON_WEB_WORKERS", "TXMON_WEB_THREADS", "TXMON_WORKER_CLASS",
                "TXMON_HTTP_CONCURRENCY")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- Postgres ------------------------------------------------------------------------------

def db_url_for(admin: str, name: str) -> str:
    return admin.split("?", 1)[0].rsplit("/", 1)[0] + "/" + name


def pg_connect(url: str):
    """An autocommit connection; waits out a server that is short of connection slots."""
    import psycopg

    for attempt in range(20):
        try:
            return psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            if "too many clients" not in str(exc) or attempt == 19:
                raise
            time.sleep(3)


def create_database(admin: str, name: str) -> None:
    with pg_connect(admin) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(admin: str, name: str) -> None:
    with pg_connect(admin) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(url: str) -> None:
    """1,000 accounts and the hot one, each funded by one seed credit (balance == ledger)."""
    users = f"(SELECT g::text AS uid FROM generate_series({USER_LO}, {USER_HI}) g " \
            f"UNION ALL SELECT '{HOT_USER}')"
    with pg_connect(url) as conn, conn.transaction():
        conn.execute(f"""
            INSERT INTO accounts (user_id, balance_cents, currency, last_seq,
                                  low_balance_threshold_cents, created_at, updated_at)
            SELECT uid, {SEED_BALANCE}, 'USD', 1, 100, now(), now() FROM {users} u""")
        conn.execute(f"""
            INSERT INTO transactions (user_id, seq, amount_cents, balance_after_cents, type,
                                      status, description, reference, created_at)
            SELECT uid, 1, {SEED_BALANCE}, {SEED_BALANCE}, 'credit', 'completed',
                   'Benchmark seed', 'bench-seed-' || uid, now() FROM {users} u""")
    with pg_connect(url) as conn:
        conn.execute("VACUUM ANALYZE")


def checkpoint(url: str) -> None:
    """Before each measured run: the same starting state for every run. Each purchase leaves a
    dead version of its account row, and on the hot account thousands pile up on one row
    (and its index entry) within seconds, slowing whatever runs next; VACUUM clears them."""
    with contextlib.suppress(Exception), pg_connect(url) as conn:
        conn.execute("VACUUM accounts")
        conn.execute("CHECKPOINT")


def pg_facts(url: str) -> dict:
    with pg_connect(url) as conn:
        facts = {"version": conn.execute("SHOW server_version").fetchone()[0]}
        for name in ("synchronous_commit", "fsync", "shared_buffers", "max_connections"):
            facts[name] = conn.execute(f"SHOW {name}").fetchone()[0]
    return facts


def count_verifications(url: str, prefix: str) -> int:
    with pg_connect(url) as conn:
        return conn.execute("SELECT count(*) FROM verifications WHERE id LIKE %s",
                            (prefix + "-%",)).fetchone()[0]


# -- CPU accounting ------------------------------------------------------------------------

class CpuSampler(threading.Thread):
    """CPU time used during a run, split into: the app (the gunicorn tree), Postgres working
    for the bench database (its backends plus the server's own processes), the load
    generator (wrk / pgbench) and everything else on the machine (other users of a shared
    machine show up there). Samples /proc every 0.2 s; a process that exits between two
    samples loses at most its last 0.2 s, so the split is approximate."""

    def __init__(self, server_pid: int | None, dbname: str):
        super().__init__(daemon=True)
        self.server_pid, self.dbname = server_pid, dbname
        self.first: dict[int, int] = {}
        self.last: dict[int, tuple[str, int]] = {}
        self.cmdline: dict[int, str] = {}
        self.done = threading.Event()

    def _kind(self, pid: int, comm: str, ppid: int) -> str:
        if self.server_pid is not None and (pid == self.server_pid or ppid == self.server_pid):
            return "app"
        if comm in ("wrk", "pgbench"):
            return "loadgen"
        if comm == "postgres":
            database = backend_database(pid, self.cmdline)
            if database is None or database == self.dbname:  # server process, or our backend
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
            self.last[pid] = (self._kind(pid, comm, ppid), ticks)

    def run(self) -> None:
        while not self.done.wait(0.2):
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
        used = {"app": 0, "postgres": 0, "loadgen": 0}
        for pid, (kind, ticks) in self.last.items():
            if kind in used:
                used[kind] += ticks - self.first.get(pid, 0)
        busy, irq = busy_ticks()
        busy, irq = busy - self.busy0, irq - self.irq0
        used["irq"] = irq  # interrupts (loopback network work) and hypervisor steal
        used["other"] = max(0, busy - sum(used.values()))
        self.seconds = {k: v / CLK_TCK for k, v in used.items()}
        self.busy_pct = 100 * busy / CLK_TCK / wall / os.cpu_count()
        self.share = {k: 100 * v / CLK_TCK / wall / os.cpu_count() for k, v in used.items()}
        return False

    def per_request(self, count: int) -> dict:
        out = {"machine_busy_pct": self.busy_pct, "other_pct": self.share["other"],
               "irq_pct": self.share["irq"]}
        for key in ("app", "postgres", "loadgen", "irq"):
            out[f"{key}_ms_per_req"] = 1000 * self.seconds[key] / count if count else None
        if self.server_pid is None:
            out["app_ms_per_req"] = None
        return out


def wait_quiet(max_wait: float, below_pct: float = 10.0) -> float | None:
    """Wait up to ``max_wait`` s until the machine's CPUs are less than ``below_pct`` busy
    over 2 s (nothing of this benchmark runs then). Returns the busy % last seen."""
    deadline, pct = time.monotonic() + max_wait, None
    while max_wait > 0:
        b0, _ = busy_ticks()
        t0 = time.monotonic()
        time.sleep(2)
        b1, _ = busy_ticks()
        pct = 100 * (b1 - b0) / CLK_TCK / (time.monotonic() - t0) / os.cpu_count()
        if pct < below_pct or time.monotonic() > deadline:
            break
    return pct


# -- capturing the write path's SQL ---------------------------------------------------------

def _tag(value):
    """A captured parameter value as JSON-safe (type, value)."""
    if value is None:
        return {"t": "none"}
    if isinstance(value, bool):
        return {"t": "bool", "v": value}
    if isinstance(value, int):
        return {"t": "int", "v": value}
    if isinstance(value, dt.datetime):
        return {"t": "datetime", "v": value.isoformat()}
    if isinstance(value, str):
        return {"t": "str", "v": value}
    obj = getattr(value, "obj", None)  # psycopg.types.json.Json / Jsonb
    if obj is not None:
        return {"t": "json", "v": json.dumps(obj)}
    return {"t": "str", "v": str(value)}


def capture_main(args) -> None:
    """(Runs in a child process.) One real purchase through the Flask app, recording every
    statement psycopg sends between BEGIN and COMMIT, with its parameters and RETURNING row.

    The recording wraps psycopg's Cursor.execute/executemany and the transaction calls, so it
    sees the write path whether it goes through SQLAlchemy or a raw psycopg cursor."""
    sys.path.insert(0, str(ROOT))
    os.environ["DATABASE_URL"] = args.db_url
    os.environ["TXMON_SERVICE_KEYS"] = "bench-capture-key"
    os.environ.setdefault("TXMON_JWT_SECRET", secrets.token_hex(24))
    import logging

    import psycopg
    from psycopg import sql as pgsql

    from api_service import create_app

    idle = psycopg.pq.TransactionStatus.IDLE
    events: list = []

    def text_of(query, conn) -> str:
        if isinstance(query, pgsql.Composable):
            return query.as_string(conn)
        return query.decode() if isinstance(query, bytes) else str(query)

    def tagged(params) -> dict:
        if params is None:
            return {}
        if hasattr(params, "items"):
            return {str(k): _tag(v) for k, v in params.items()}
        return {str(i): _tag(v) for i, v in enumerate(params)}

    def around(conn, record, call, at=None):
        if conn.autocommit:  # BEGIN / COMMIT are the caller's own statements (recorded)
            return call()
        before = conn.info.transaction_status
        at = len(events) if at is None else at
        try:
            return call()
        finally:
            after = conn.info.transaction_status
            if before == idle and after != idle:
                events.insert(at, {"kind": "begin"})
            elif before != idle and after == idle and record:
                events.append({"kind": record})

    orig = {"execute": psycopg.Cursor.execute, "executemany": psycopg.Cursor.executemany,
            "fetchone": psycopg.Cursor.fetchone,
            "commit": psycopg.Connection.commit, "rollback": psycopg.Connection.rollback,
            "enter": psycopg.Transaction.__enter__, "exit": psycopg.Transaction.__exit__}

    pipelines = itertools.count(1)

    last_event: dict = {}

    def returned(cur, ev) -> None:
        res = cur.pgresult
        if cur.description and res is not None and res.ntuples == 1:
            ev["returned"] = {col.name: (None if res.get_value(0, i) is None
                                         else bytes(res.get_value(0, i)).decode())
                              for i, col in enumerate(cur.description)}

    def execute(self, query, params=None, **kw):
        statement = text_of(query, self.connection)
        pipeline = getattr(self.connection, "_bench_pipeline", None)
        if "; " in statement:
            return compound(self, query, statement, params, **kw)
        verb = statement.strip().upper()
        if verb in ("BEGIN", "COMMIT", "ROLLBACK"):  # sent as statements (autocommit)
            events.append({"kind": {"BEGIN": "begin", "COMMIT": "commit"}.get(verb, verb.lower()),
                           "pipeline": pipeline})
            return orig["execute"](self, query, params, **kw)
        ev = {"kind": "execute", "statement": statement, "executemany": False,
              "params": [tagged(params)], "pipeline": pipeline}
        events.append(ev)
        last_event[id(self)] = ev  # psycopg's cursors take no new attributes
        out = around(self.connection, None,
                     lambda: orig["execute"](self, query, params, **kw), at=len(events) - 1)
        returned(self, ev)  # in pipeline mode the result comes with the fetch instead
        return out

    bound: dict = {}  # cursor id -> [(template, params, bound text)] since its last execute

    def mogrify(self, query, params=None):
        out = orig["mogrify"](self, query, params)
        bound.setdefault(id(self), []).append((text_of(query, self.connection), params, out))
        return out

    def compound(self, query, statement, params, **kw):
        """Several statements sent as one message (shared.db.RawSql's ledger transaction,
        client-side binding): recorded one by one, as one round trip (like a pipeline);
        the last one's result is what a fetch reads. RawSql binds each statement with
        ``mogrify`` before joining them: a statement is recognized by its bound text (which
        may hold "; " inside a value) and recorded as its template and parameters; what
        was not bound (BEGIN, COMMIT) is fixed text up to the next "; "."""
        rest = list(params or ())
        pending = bound.pop(id(self), [])
        trip = next(pipelines)
        at = 0
        while at < len(statement):
            if pending and statement.startswith(pending[0][2], at):
                text, mine, out = pending.pop(0)
                at += len(out)
            else:
                end = statement.find("; ", at)
                end = len(statement) if end < 0 else end
                text, at = statement[at:end], end
                n = len(re.findall(r"(?<!%)%s", text))
                mine, rest = rest[:n], rest[n:]
            at += 2 if statement.startswith("; ", at) else 0
            verb = text.strip().upper()
            if verb in ("BEGIN", "COMMIT"):
                events.append({"kind": verb.lower(), "pipeline": trip})
                continue
            ev = {"kind": "execute", "statement": text, "executemany": False,
                  "params": [tagged(mine)], "pipeline": trip}
            events.append(ev)
            last_event[id(self)] = ev
        return orig["execute"](self, query, params, **kw)

    def fetchone(self):
        row = orig["fetchone"](self)
        ev = last_event.get(id(self))
        if ev is not None and "returned" not in ev:
            returned(self, ev)
        return row

    def executemany(self, query, params_seq, **kw):
        params_seq = list(params_seq)
        events.append({"kind": "execute", "statement": text_of(query, self.connection),
                       "executemany": True, "params": [tagged(p) for p in params_seq]})
        return around(self.connection, None,
                      lambda: orig["executemany"](self, query, params_seq, **kw),
                      at=len(events) - 1)

    def tx_exit(self, exc_type, exc, tb):
        return around(self._conn, "commit" if exc_type is None else "rollback",
                      lambda: orig["exit"](self, exc_type, exc, tb))

    @contextlib.contextmanager
    def pipeline(self):
        with orig["pipeline"](self) as p:
            self._bench_pipeline = next(pipelines)
            try:
                yield p
            finally:
                self._bench_pipeline = None

    orig["pipeline"] = psycopg.Connection.pipeline
    psycopg.Connection.pipeline = pipeline
    orig["mogrify"] = psycopg.ClientCursor.mogrify
    psycopg.ClientCursor.mogrify = mogrify
    psycopg.Cursor.execute = execute
    psycopg.Cursor.fetchone = fetchone
    psycopg.Cursor.executemany = executemany
    psycopg.Connection.commit = lambda self: around(self, "commit",
                                                    lambda: orig["commit"](self))
    psycopg.Connection.rollback = lambda self: around(self, "rollback",
                                                      lambda: orig["rollback"](self))
    psycopg.Transaction.__enter__ = lambda self: around(self._conn, None,
                                                        lambda: orig["enter"](self))
    psycopg.Transaction.__exit__ = tx_exit

    app = create_app()
    logging.disable(logging.INFO)
    client = app.test_client()
    tag = secrets.token_hex(4)
    for n in (1, 2):  # the second request is the one recorded (connection set-up excluded)
        events.clear()
        response = client.post("/api/v1/verifications",
                               headers={"X-API-Key": "bench-capture-key"},
                               json={"id": f"capture-{tag}-{n}", "user_id": args.user,
                                     "service_name": "WhatsApp", "country": "US",
                                     "cost_cents": 1, "timeout_seconds": 300})
        if response.status_code != 201:
            raise SystemExit(f"capture request failed: {response.status_code} "
                             f"{response.get_data(as_text=True)}")
    Path(args.out).write_text(json.dumps({"events": events, "user_id": args.user,
                                          "verification_id": f"capture-{tag}-2",
                                          "response": response.get_json()}, indent=1))


def capture_sql(url: str, out: Path) -> dict:
    subprocess.run([sys.executable, __file__, "_capture", "--db-url", url, "--user",
                    str(USER_LO), "--out", str(out)], check=True, cwd=ROOT)
    return json.loads(out.read_text())


# -- the pgbench script -------------------------------------------------------------------

_TABLE = re.compile(r"^\s*(?:UPDATE|INSERT\s+INTO|DELETE\s+FROM)\s+(\w+)", re.I)
_PARAM = re.compile(r"%%|%(?:\((\w+)\))?[sbt]")  # psycopg: %s %b %t, named or not, %%
_INSERT = re.compile(r"\s*INSERT\s+INTO\s+\w+\s*\(([^)]*)\)\s*VALUES\s*", re.I | re.S)


def _insert_columns(statement: str) -> dict[int, str]:
    """For INSERT ... (cols) VALUES (...), (...): placeholder ordinal -> its column."""
    m = _INSERT.match(statement)
    if not m:
        return {}
    cols = [c.strip().strip('"') for c in m.group(1).split(",")]
    names, depth, elem, ordinal, quoted, i = {}, 0, 0, 0, False, m.end()
    while i < len(statement):
        ch = statement[i]
        if quoted:
            quoted = ch != "'"
        elif ch == "'":
            quoted = True
        elif ch == "(":
            depth += 1
            elem = 0 if depth == 1 else elem
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 1:
            elem += 1
        elif ch == "%":
            pm = _PARAM.match(statement, i)
            if pm and pm.group(0) != "%%":
                if depth >= 1 and elem < len(cols):
                    names[ordinal] = cols[elem]
                ordinal += 1
            if pm:
                i = pm.end()
                continue
        i += 1
    return names


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# Ids the write path draws in its UPDATE ... RETURNING (column alias -> the INSERT columns
# that take them; ``col@table`` for a column of one table only).
RETURNED_IDS = {"tx_id": {"id@transactions", "transaction_id", "charge_transaction_id"},
                "note_id": {"id@notifications", "notification_id"}}


class PgbenchScript:
    """Turns the captured statements into a pgbench script (see module docstring)."""

    def __init__(self, capture: dict):
        self.capture = capture
        self.returned: list[tuple[str, str, str]] = []  # (table, column, value) seen so far
        self.table = ""  # the table of the statement being rendered
        self.mapped: dict[str, int] = {}
        execs = [e for e in capture["events"] if e["kind"] == "execute"]
        stamps = [p["v"] for e in execs for row in e["params"] for p in row.values()
                  if p["t"] == "datetime"]
        self.now = min(dt.datetime.fromisoformat(s) for s in stamps) if stamps else None

    def _value(self, key: str, tagged: dict) -> str:
        base = re.sub(r"__\d+$", "", key)  # insertmanyvalues renames params name__0, name__1
        kind, value = tagged["t"], tagged.get("v")
        if kind == "none":
            return "NULL"
        if kind == "bool":
            return "true" if value else "false"
        if kind == "datetime":
            offset = (dt.datetime.fromisoformat(value) - self.now).total_seconds()
            return "now()" if offset == 0 else f"(now() + interval '{offset:g} seconds')"
        if kind == "str" and value == self.capture["user_id"]:
            return self._var(":uid")
        if kind == "str" and value == self.capture["verification_id"]:
            return self._var(":vid")
        if kind == "int":
            for table, column, returned in reversed(self.returned):
                singular = table[:-1] if table.endswith("s") else table
                names = {column, f"{singular}_{column}", {"last_seq": "seq"}.get(column),
                         {"balance_cents": "balance_after_cents"}.get(column)}
                names |= RETURNED_IDS.get(column, set())
                if str(value) == returned and (base in names or f"{base}@{self.table}" in names
                                               or base.endswith(f"{singular}_{column}")):
                    return self._var(f":{table}_{column}")
            return str(value)
        if kind in ("str", "json"):
            return _quote(value)
        raise ValueError(f"unexpected parameter {key}={tagged}")

    def _var(self, name: str) -> str:
        self.mapped[name] = self.mapped.get(name, 0) + 1
        return name

    def _statement(self, statement: str, row: dict) -> str:
        columns = _insert_columns(statement)
        ordinal = 0

        def one(m):
            nonlocal ordinal
            if m.group(0) == "%%":
                return "%"
            key = m.group(1) if m.group(1) is not None else str(ordinal)
            hint = columns.get(ordinal, key)
            ordinal += 1
            return self._value(hint, row[key])

        return " ".join(_PARAM.sub(one, statement).split())

    def body(self) -> str:
        lines = []
        in_pipeline = None  # the number of the pipeline being written out
        for ev in self.capture["events"]:
            if in_pipeline is not None and (ev.get("pipeline") != in_pipeline
                                            or "returned" in ev):
                lines.append("\\endpipeline")
                in_pipeline = None
            if ev["kind"] == "begin":
                lines.append("BEGIN;")
            elif ev["kind"] == "commit":
                lines.append("COMMIT;")
            elif ev["kind"] == "rollback":
                raise SystemExit("the captured request rolled back; nothing to replay")
            else:
                table = self.table = (_TABLE.match(ev["statement"]) or [None, "q"])[1].lower()
                rendered = [self._statement(ev["statement"], row) for row in ev["params"]]
                if ev.get("pipeline") is not None and "returned" not in ev:
                    # Statements sent in one psycopg pipeline (one round trip), as they were.
                    if ev["pipeline"] != in_pipeline:
                        if in_pipeline is not None:
                            lines.append("\\endpipeline")
                        lines.append("\\startpipeline")
                        in_pipeline = ev["pipeline"]
                    lines.extend(sql + ";" for sql in rendered)
                    continue
                if in_pipeline is not None:
                    lines.append("\\endpipeline")
                    in_pipeline = None
                if ev["executemany"] and len(rendered) > 1:
                    # psycopg 3 runs executemany as one pipeline (one round trip).
                    lines.append("\\startpipeline")
                    lines.extend(sql + ";" for sql in rendered)
                    lines.append("\\endpipeline")
                else:
                    for sql in rendered:
                        if "returned" in ev:
                            lines.append(f"{sql} \\gset {table}_")
                        else:
                            lines.append(sql + ";")
                for column, value in (ev.get("returned") or {}).items():
                    if value is not None:
                        self.returned.append((table, column, value))
        if in_pipeline is not None:
            lines.append("\\endpipeline")
        kinds = [e["kind"] for e in self.capture["events"]]
        if "commit" in kinds and kinds[0] != "begin":
            raise SystemExit(f"captured statements outside the transaction: {kinds}")
        if ":uid" not in self.mapped or ":vid" not in self.mapped:
            raise SystemExit("could not find the user id / verification id in the captured SQL")
        return "\n".join(lines) + "\n"

    def write(self, path: Path, hot: bool) -> str:
        body = self.body()
        uid = f"\\set uid {HOT_USER}" if hot else f"\\set uid random({USER_LO}, {USER_HI})"
        header = ("-- generated by scripts/bench_write from the statements of one real "
                  "POST /api/v1/verifications\n" + uid + "\n"
                  "\\set vid 1000000000000000 * :run + 1000000000000 * :client_id"
                  " + random(1, 999999999999)\n")
        path.write_text(header + body)
        return header + body


# -- processes ------------------------------------------------------------------------------

def gunicorn_settings(env: dict) -> dict:
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from shared.config import Config  # the app's own default for its admission limit

    limit = env.get("TXMON_HTTP_CONCURRENCY")
    return {"workers": conf["workers"], "threads": conf.get("threads", 1),
            "worker_class": conf["worker_class"],
            "worker_connections": conf.get("worker_connections", 1000),
            "http_concurrency": int(limit) if limit else Config().HTTP_CONCURRENCY}


def describe(gs: dict) -> str:
    """gunicorn settings in words (threads matter to gthread only)."""
    if gs["worker_class"] == "gthread":
        return f"{gs['workers']} workers x {gs['threads']} threads, worker class `gthread`"
    if gs["worker_class"] in ("gevent", "eventlet") and gs.get("worker_connections"):
        limit = gs.get("http_concurrency")
        return (f"{gs['workers']} workers, worker class `{gs['worker_class']}` "
                f"(worker_connections {gs['worker_connections']}; "
                + (f"at most {limit} plain HTTP requests at once per worker, "
                   "TXMON_HTTP_CONCURRENCY)" if limit else "no HTTP admission limit)"))
    return f"{gs['workers']} workers, worker class `{gs['worker_class']}`"


@dataclass
class Server:
    env: dict
    workdir: Path
    label: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(self.env, PORT=str(self.port))
        prom = self.workdir / f"prom-{self.port}"
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
        self.log_path = self.workdir / f"gunicorn-{self.label}.log"
        self.logfile = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "gunicorn"), "-c", "gunicorn.conf.py",
             "api_service.wsgi:app"], cwd=ROOT, env=env, stdout=self.logfile,
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"gunicorn exited; see {self.log_path}:\n"
                                 + self.log_path.read_text()[-3000:])
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.2)
        raise SystemExit(f"gunicorn did not answer /healthz in 60 s; see {self.log_path}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            self.logfile.close()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this script started
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.logfile.close()

    def access_log_statuses(self) -> dict:
        counts: dict[str, int] = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = re.search(r'"POST /api/v1/verifications HTTP/[\d.]+" (\d{3}) ', line)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        return counts


def run_wrk(server: Server, *, case: str, prefix: str, duration: float, connections: int,
            threads: int, api_key: str) -> dict:
    env = dict(os.environ, BENCH_API_KEY=api_key, BENCH_ID_PREFIX=prefix,
               BENCH_USER_LO=str(USER_LO), BENCH_USER_HI=str(USER_HI),
               BENCH_HOT_USER=str(HOT_USER) if case == "hot" else "")
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
           "-s", str(LUA), server.url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    m = re.search(r"^BENCH_RESULT (\{.*\})$", out, re.M)
    if not m:
        raise SystemExit("wrk printed no result:\n" + out)
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["socket_errors"] = sum(r[k] for k in ("errors_connect", "errors_read", "errors_write",
                                             "errors_timeout"))
    r["non_2xx"] = r["errors_status"]
    return r


def api_case(server: Server, db: str, *, case: str, run_id: str, duration: float,
             connections: int, threads: int, api_key: str, warmup: float,
             quiet_wait: float = 0) -> dict:
    wait_quiet(quiet_wait)
    if warmup:
        run_wrk(server, case=case, prefix=f"{run_id}w{case}", duration=warmup,
                connections=connections, threads=threads, api_key=api_key)
    checkpoint(db)
    prefix = f"{run_id}{case[0]}"
    log_before = server.access_log_statuses()
    dbname = db.rsplit("/", 1)[1].split("?")[0]
    with CpuSampler(server.proc.pid, dbname) as cpu:
        r = run_wrk(server, case=case, prefix=prefix, duration=duration,
                    connections=connections, threads=threads, api_key=api_key)
    r["cpu"] = cpu.per_request(r["requests"])
    r["rows_written"] = count_verifications(db, prefix)
    time.sleep(0.2)
    log_after = server.access_log_statuses()
    r["access_log"] = {code: n - log_before.get(code, 0) for code, n in log_after.items()
                       if n - log_before.get(code, 0)}
    return r


def run_pgbench(db: str, script: Path, *, clients: int, duration: float, run: int,
                quiet_wait: float = 0) -> dict | None:
    wait_quiet(quiet_wait)
    cmd = ["pgbench", "-n", "-M", "prepared", "-f", str(script), "-c", str(clients),
           "-j", str(min(2, clients)), "-T", f"{duration:g}", "-D", f"run={run}", db]
    for attempt in range(4):
        with CpuSampler(None, db.rsplit("/", 1)[1].split("?")[0]) as cpu:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        if "too many clients" not in out:
            break
        # A shared server may be short of connection slots for a moment: retry, then give up.
        log(f"  pgbench c={clients}: the server has too few free connections; retrying")
        time.sleep(5)
    else:
        log(f"  pgbench c={clients}: skipped, the server had no {clients} free connections")
        return None
    tps = re.search(r"^tps = ([\d.]+) \(without initial connection time\)", out, re.M)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    lat = re.search(r"latency average = ([\d.]+) ms", out)
    if proc.returncode != 0 or not tps or "aborted" in out:
        raise SystemExit(f"pgbench failed ({' '.join(cmd)}):\n{out[-3000:]}")
    count = int(done.group(1))
    return {"clients": clients, "tps": float(tps.group(1)), "transactions": count,
            "failed": int(failed.group(1)) if failed else 0,
            "latency_ms": float(lat.group(1)) if lat else None,
            "cpu": cpu.per_request(count)}


# -- the report -----------------------------------------------------------------------------

def machine_facts() -> dict:
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    wrk_v = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    pgb_v = subprocess.run(["pgbench", "--version"], capture_output=True, text=True)
    return {"nproc": os.cpu_count(), "ram_gib": mem_kb / 1024 / 1024,
            "cpu": model.group(1).strip() if model else platform.machine(),
            "kernel": platform.release(), "python": platform.python_version(),
            "wrk": (wrk_v.stdout + wrk_v.stderr).split("Copyright")[0].strip(),
            "pgbench": pgb_v.stdout.strip()}


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.1f} ms"


def _cpu_cell(c: dict, key: str) -> str:
    v = c.get(f"{key}_ms_per_req")
    return "-" if v is None else f"{v:.2f}"


def render_section(res: dict, carried: list[str]) -> str:
    m, gs, a, pg = res["machine"], res["gunicorn"], res["args"], res["pg_facts"]
    lines = [SECTION, "",
             f"Measured {res['date']} by `scripts/bench_write`; the numbers in this section "
             "are from that run and are rewritten by the next one. To rerun:", "",
             "```", res["command"], "```", "",
             f"- **Machine**: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']:.1f} GiB RAM, "
             f"Linux {m['kernel']}, Python {m['python']}; PostgreSQL {pg['version']} on the "
             f"same machine (synchronous_commit={pg['synchronous_commit']}, "
             f"fsync={pg['fsync']}, shared_buffers={pg['shared_buffers']}). Load generator, "
             "gunicorn and Postgres share the CPUs. Load average at the start: "
             f"{res['loadavg']}; the machine may be shared, so every run records the CPU "
             "share of *other* processes (see the CPU table).",
             "- **Server**: `gunicorn -c gunicorn.conf.py api_service.wsgi:app`, "
             f"{describe(gs)} ({res['gunicorn_source']}); access log on (to a file), "
             "app log at INFO, Prometheus multiprocess metrics on: as served by default. "
             "Celery worker and beat are not running (outbox rows are written, not consumed).",
             f"- **Load generator**: {m['wrk']}, `wrk -t{a['wrk_threads']} "
             f"-c{a['connections']} -d{a['duration']:g}s` (a {a['warmup']:g} s warm-up first) "
             "with `scripts/bench/verifications.lua`: a new verification id per request, "
             "`user_id` random over the 1,000 accounts (case a) or always the hot account "
             "(case b), `cost_cents` 1, `timeout_seconds` 300, header `X-API-Key`.",
             f"- **Database's own rate**: {m['pgbench']}, `pgbench -n -M prepared -f SCRIPT "
             f"-c N -j 2 -T {a['pg_duration']:g}` with N in "
             f"{{{', '.join(str(c) for c in a['pg_clients'])}}}, the script generated from "
             "the statements the write path executed for one real request (see the end of "
             "this section). The ratio uses the **best** client count, i.e. the database's "
             "best rate.",
             f"- **Method**: {a['rounds']} rounds, interleaved (per case: the API, served "
             "afresh and warmed up, then pgbench); each number is the best of its rounds, on "
             "both sides alike."
             + (" Before every measured run the accounts table is vacuumed (the hot row's "
                "dead versions would otherwise slow whatever runs next) and a checkpoint "
                "taken." if res.get("vacuum_between_runs") else ""), "",
             RESULTS_HEADING, "",
             "| case | API req/s | p50 | p99 | non-2xx | pgbench tps (clients) | "
             "API / pgbench | target | met? |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for case in ("random", "hot"):
        api, best = res["api"][case], res["pg_best"][case]
        ratio = api["rps"] / best["tps"]
        met = "**met**" if ratio >= TARGETS[case] else "**not met**"
        lines.append(
            f"| ({'a' if case == 'random' else 'b'}) {CASE_NAMES[case]} | {api['rps']:.0f} | "
            f"{fmt_ms(api['p50_us'])} | {fmt_ms(api['p99_us'])} | {api['non_2xx_total']} | "
            f"{best['tps']:.0f} (c={best['clients']}) | {ratio:.2f} | >= {TARGETS[case]} | "
            f"{met} |")
    others = [res["api"][c]["cpu"]["other_pct"] for c in res["api"]]
    others += [res["pg_best"][c]["cpu"]["other_pct"] for c in res["pg_best"]]
    if max(others) > 10:
        lines += ["", f"**Caution**: other processes used {min(others):.0f}-{max(others):.0f}% "
                  "of the CPUs during the best runs (the machine was shared; see the CPU "
                  "table), so these numbers understate both rates by an unknown, unequal "
                  "amount. Rerun on a quiet machine (or with `--wait-quiet 120`) before "
                  "drawing conclusions from small differences."]
    lines += ["", "Non-2xx counts all rounds (wrk); socket errors: "
              + ", ".join(f"{c} {res['api'][c]['socket_errors_total']}" for c in res["api"])
              + ". Status codes in gunicorn's access log over the measured windows: "
              + "; ".join(f"{c} {json.dumps(res['api'][c]['access_log_total'])}"
                          for c in res["api"])
              + ". Verification rows the API wrote in those windows: "
              + ", ".join(f"{c} {res['api'][c]['rows_total']} (wrk counted "
                          f"{res['api'][c]['requests_total']} responses)" for c in res["api"])
              + ".", "", "Every round (API req/s; pgbench tps per client count):", "",
              "| case | API | " + " | ".join(f"pgbench c={c}" for c in a["pg_clients"]) + " |",
              "| --- | --- |" + " --- |" * len(a["pg_clients"])]
    for case in ("random", "hot"):
        cells = [", ".join(f"{x:.0f}" for x in res["api"][case]["rounds"])]
        cells += [", ".join(f"{x:.0f}" for x in r["rounds"]) or "skipped (no free "
                  "connections)" for r in res["pg"][case]]
        lines.append(f"| {CASE_NAMES[case]} | " + " | ".join(cells) + " |")
    lines += ["", "CPU time per request (API) or per transaction (pgbench), in ms, for the "
              "best runs, sampled from /proc. Shares are of all CPUs: *irq* is interrupt "
              "time (loopback networking) and steal, charged to no process; *other "
              "processes* is everything not in this benchmark:", "",
              "| run | app (gunicorn) | Postgres | load generator | machine busy | irq | "
              "other processes |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = [(f"API, {CASE_NAMES[c]}", res["api"][c]["cpu"]) for c in ("random", "hot")]
    rows += [(f"pgbench c={res['pg_best'][c]['clients']}, {CASE_NAMES[c]}",
              res["pg_best"][c]["cpu"]) for c in ("random", "hot")]
    for label, c in rows:
        lines.append(f"| {label} | {_cpu_cell(c, 'app')} | {_cpu_cell(c, 'postgres')} | "
                     f"{_cpu_cell(c, 'loadgen')} | {c['machine_busy_pct']:.0f}% | "
                     f"{c.get('irq_pct', 0):.0f}% | {c['other_pct']:.0f}% |")
    def total(c):
        return sum(c.get(f"{k}_ms_per_req") or 0 for k in ("app", "postgres", "loadgen", "irq"))

    cost = {c: total(res["pg_best"][c]["cpu"]) / total(res["api"][c]["cpu"])
            for c in ("random", "hot")}
    lines += ["", "CPU cost ratio (pgbench's CPU per transaction / the API's CPU per request, "
              "each counting app, Postgres, load generator and irq): "
              f"{CASE_NAMES['random']} **{cost['random']:.2f}**, {CASE_NAMES['hot']} "
              f"{cost['hot']:.2f}. Unlike the throughput ratio it hardly depends on what "
              "else runs on the machine: over the 1,000 accounts it is the ratio to expect "
              "when both sides are limited by CPU alone (pgbench also waits on WAL flushes, "
              "so the measured ratio can come out higher). On the hot account both sides "
              "mostly wait on the row lock, and it does not apply."]
    lines.append("")
    if res.get("sweep"):
        lines += render_sweep(res)
    for block in carried:  # subsections written by hand or by an earlier --sweep run
        if not (res.get("sweep") and block.startswith(SWEEP_HEADING)):
            lines += [block.rstrip(), ""]
    lines += [SQL_HEADING, "",
              "The write path's own statements, captured by wrapping psycopg's cursor around "
              "one real request: statement text exactly as sent. The ledger's transaction "
              "sends its statements as two messages (simple query protocol, parameters bound "
              "on the client: shared/db.py RawSql); pgbench sends what went in one message "
              "between `\\startpipeline` and `\\endpipeline`, prepared (`-M prepared`), "
              "its fastest way to run the same statements. A statement "
              "whose RETURNING row is read stays outside (pgbench's `\\gset` cannot be "
              "pipelined), so pgbench sends BEGIN on a round trip of its own where the API "
              "sends it with the UPDATE. Values are the captured ones except the user id "
              "(`:uid`), the verification id (`:vid`, unique per transaction), values "
              "RETURNed by earlier statements (`\\gset`) and timestamps (`now()` plus the "
              "captured offset). Strings derived from those (notification text and link, "
              "outbox JSON payloads) keep the captured request's text.", "",
              "<details><summary>pgbench script, case (a); case (b) sets "
              f"<code>uid</code> to {HOT_USER}</summary>", "", "```sql",
              res["script"].rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def render_sweep(res: dict) -> list[str]:
    rows = res["sweep"]
    a = res["args"]
    best = {case: max(rows, key=lambda r: r[case]["rps"]) for case in ("random", "hot")}
    total = max(rows, key=lambda r: r["random"]["rps"] / res["pg_best"]["random"]["tps"]
                + r["hot"]["rps"] / res["pg_best"]["hot"]["tps"])
    lines = [SWEEP_HEADING, "",
             f"Measured {res['date']} with `{res['command']}`: each setting served "
             f"afresh, {a['sweep_duration']:g} s per case after a {min(a['warmup'], 2):g} s "
             f"warm-up, same wrk settings (-c{a['connections']}), {a['rounds']} rounds "
             "round-robin over the settings, best round shown (all rounds in brackets). "
             "Threads apply to `gthread` only (`sync` with threads > 1 would become gthread; "
             "`gevent` serves up to worker_connections requests per process instead, of "
             "which at most TXMON_HTTP_CONCURRENCY plain HTTP requests run at once; "
             "*off*: no limit)."
             + ("" if res.get("vacuum_between_runs") else
                " This sweep ran before the benchmark vacuumed the accounts table between "
                "runs, so hot-account numbers drift down within it (the hot row's dead "
                "versions pile up); compare hot-account settings within a round."), "",
             "*CPU/req* is the app's plus Postgres's CPU per request over the 1,000 accounts "
             "(lowest of the rounds): it depends far less than req/s on other processes.", "",
             "| TXMON_WORKER_CLASS | TXMON_WEB_WORKERS | TXMON_WEB_THREADS | "
             "TXMON_HTTP_CONCURRENCY | req/s, 1,000 "
             "accounts | p99 | CPU/req | req/s, hot account | p99 | non-2xx | "
             "other processes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        s = r["settings"]
        others = r["random"]["other_pcts"] + r["hot"]["other_pcts"]

        def all_rounds(case):
            return "(" + ", ".join(f"{x:.0f}" for x in r[case]["rounds"]) + ")"

        threads_cell = s["threads"] if s["worker_class"] == "gthread" else "-"
        limit_cell = s.get("http_concurrency") or "off"
        lines.append(f"| {s['worker_class']} | {s['workers']} | {threads_cell} | {limit_cell} | "
                     f"{r['random']['rps']:.0f} {all_rounds('random')} | "
                     f"{fmt_ms(r['random']['p99_us'])} | "
                     f"{r['random'].get('cpu_ms_min', float('nan')):.2f} ms | "
                     f"{r['hot']['rps']:.0f} {all_rounds('hot')} | "
                     f"{fmt_ms(r['hot']['p99_us'])} | "
                     f"{r['random']['non_2xx'] + r['hot']['non_2xx']} | "
                     f"{min(others):.0f}-{max(others):.0f}% |")

    def name(r):
        s = r["settings"]
        if s["worker_class"] == "gthread":
            return f"gthread, {s['workers']} workers x {s['threads']} threads"
        if s.get("http_concurrency"):
            return (f"{s['worker_class']}, {s['workers']} workers, "
                    f"TXMON_HTTP_CONCURRENCY={s['http_concurrency']}")
        return f"{s['worker_class']}, {s['workers']} workers"

    d = res["gunicorn"]
    cheap = min(rows, key=lambda r: r["random"].get("cpu_ms_min", float("inf")))
    if "cpu_ms_min" in cheap["random"]:
        lines += ["", f"Least CPU per request over 1,000 accounts: **{name(cheap)}** "
                  f"({cheap['random']['cpu_ms_min']:.2f} ms)."]
    lines += ["", f"Best over 1,000 accounts: **{name(best['random'])}** "
              f"({best['random']['random']['rps']:.0f} req/s); best on the hot account: "
              f"**{name(best['hot'])}** ({best['hot']['hot']['rps']:.0f} req/s); best for both "
              f"(sum of the two ratios): **{name(total)}**. The default in gunicorn.conf.py is "
              f"{describe(d)}."
              + (" Where other processes took a large CPU share, differences of less than "
                 "about 20% between settings are not meaningful."
                 if max(o for r in rows for c in ("random", "hot")
                        for o in r[c]["other_pcts"]) > 10 else ""), ""]
    return lines


def write_doc(res: dict) -> None:
    """Replace this benchmark's section of docs/PERFORMANCE.md, keeping the rest of the file
    and any ### subsection of the old section this run does not produce itself."""
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    start = text.find(SECTION + "\n")
    carried: list[str] = []
    if start >= 0:
        nxt = re.search(r"^## ", text[start + len(SECTION):], re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        for block in re.findall(r"^### .*?(?=^### |\Z)", text[start:end], re.M | re.S):
            if not block.startswith((RESULTS_HEADING, SQL_HEADING)):
                carried.append(block)
        text = (text[:start] + render_section(res, carried) + "\n"
                + text[end:].lstrip("\n"))
    else:
        text = text.rstrip("\n") + "\n\n" + render_section(res, [])
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text.rstrip("\n") + "\n")


# -- main -----------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/bench_write", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2,
                   help="measure everything this many times, interleaved; best is used (2)")
    p.add_argument("--duration", type=float, default=15, help="seconds per API run (15)")
    p.add_argument("--warmup", type=float, default=3, help="warm-up seconds before each case")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (2)")
    p.add_argument("--pg-duration", type=float, default=12, help="seconds per pgbench run (12)")
    p.add_argument("--pg-clients", default="8,16,64",
                   help="pgbench client counts to try, comma-separated (8,16,64); best is used")
    p.add_argument("--sweep", action="store_true",
                   help="also try 15 gunicorn settings (adds about 12 minutes with the defaults)")
    p.add_argument("--sweep-duration", type=float, default=8,
                   help="seconds per sweep case (8); the sweep takes about "
                        "rounds x 15 x (2 x duration + 8) s")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="before each measurement wait up to S seconds for the machine to be "
                        "less than 10%% busy (for shared machines; default 0: no wait)")
    p.add_argument("--db", default="txmon_bench", help="database to create and drop")
    p.add_argument("--no-doc", action="store_true", help="print results, leave the doc alone")
    p.add_argument("--keep", action="store_true", help="keep the database and work files")
    p.add_argument("--render", metavar="FILE",
                   help="measure nothing: rewrite the doc section from a saved var/bench/*.json")
    return p.parse_args(argv)


def main(argv) -> int:
    if argv[:1] == ["_capture"]:
        p = argparse.ArgumentParser()
        p.add_argument("_capture")
        p.add_argument("--db-url", required=True)
        p.add_argument("--user", required=True)
        p.add_argument("--out", required=True)
        capture_main(p.parse_args(argv))
        return 0
    args = parse_args(argv)
    if args.render:
        write_doc(json.loads(Path(args.render).read_text()))
        log(f"wrote {DOC.relative_to(ROOT)} from {args.render}")
        return 0
    if not args.db.startswith("txmon_bench"):
        raise SystemExit("--db must start with txmon_bench (it is dropped afterwards)")
    for tool in ("wrk", "pgbench"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install -y {tool} "
                             "postgresql-client)")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    admin = admin_url()
    db = db_url_for(admin, args.db)
    workdir = Path(tempfile.mkdtemp(prefix="txmon-bench-"))
    pg_clients = [int(c) for c in args.pg_clients.split(",") if c.strip()]
    if not all(0 < c < 1000 for c in pg_clients):
        raise SystemExit("--pg-clients: each count must be 1..999")
    api_key = "bench-" + secrets.token_hex(16)
    run_id = secrets.token_hex(3)
    base_env = {k: v for k, v in os.environ.items()
                if k not in GUNICORN_ENV + ("PORT", "PROMETHEUS_MULTIPROC_DIR")}
    base_env.update(DATABASE_URL=db, TXMON_SERVICE_KEYS=api_key,
                    TXMON_JWT_SECRET=secrets.token_hex(24))
    server_env = dict(base_env, **{k: os.environ[k] for k in GUNICORN_ENV if k in os.environ})
    res: dict = {"args": dict(vars(args), pg_clients=pg_clients), "api": {}, "pg": {},
                 "machine": machine_facts(),
                 "gunicorn": gunicorn_settings(server_env),
                 "gunicorn_source": ("from " + ", ".join(f"{k}={os.environ[k]}" for k in
                                                         GUNICORN_ENV if k in os.environ))
                 if any(k in os.environ for k in GUNICORN_ENV) else "its defaults",
                 "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
                 "vacuum_between_runs": True,
                 "command": "scripts/bench_write" + "".join(f" {shlex_quote(a)}" for a in argv)}
    server = None
    try:
        log(f"creating database {args.db} on {re.sub(r'//[^@]*@', '//', admin)}")
        create_database(admin, args.db)
        env = dict(base_env)
        subprocess.run([str(ROOT / ".venv" / "bin" / "flask"), "--app", "api_service", "db",
                        "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True)
        seed(db)
        res["pg_facts"] = pg_facts(db)
        log("capturing the write path's SQL from one real request")
        capture = capture_sql(db, workdir / "capture.json")
        gen = PgbenchScript(capture)
        scripts = {"random": workdir / "write_random.sql", "hot": workdir / "write_hot.sql"}
        res["script"] = gen.write(scripts["random"], hot=False)
        PgbenchScript(capture).write(scripts["hot"], hot=True)
        check = subprocess.run(["pgbench", "-n", "-M", "prepared", "-f", str(scripts["random"]),
                                "-t", "3", "-D", "run=9", db], capture_output=True, text=True)
        if check.returncode != 0 or "aborted" in check.stdout + check.stderr:
            raise SystemExit("the generated pgbench script fails:\n" + check.stdout
                             + check.stderr + "\n" + res["script"])

        api_runs: dict = {"random": [], "hot": []}
        pg_runs: dict = {case: {c: [] for c in pg_clients} for case in ("random", "hot")}
        pg_run_no = 0
        for rnd in range(1, args.rounds + 1):
            for case in ("random", "hot"):
                # Served afresh for each API run and stopped before pgbench, so its idle
                # pool holds no connection slots while pgbench runs.
                server = Server(server_env, workdir, f"{case}{rnd}")
                log(f"round {rnd}/{args.rounds}, API, {CASE_NAMES[case]}: "
                    f"{args.duration:g} s, {args.connections} connections "
                    f"({server.url}, {res['gunicorn']})")
                server.start()
                r = api_case(server, db, case=case, run_id=f"{run_id}r{rnd}",
                             duration=args.duration, connections=args.connections,
                             threads=args.wrk_threads, api_key=api_key,
                             warmup=args.warmup, quiet_wait=args.wait_quiet)
                server.stop()
                api_runs[case].append(r)
                log(f"  {r['rps']:.0f} req/s, p50 {fmt_ms(r['p50_us'])}, p99 "
                    f"{fmt_ms(r['p99_us'])}, non-2xx {r['non_2xx']}, socket errors "
                    f"{r['socket_errors']}, other processes {r['cpu']['other_pct']:.0f}% CPU")
                for clients in pg_clients:
                    pg_run_no += 1
                    checkpoint(db)
                    r = run_pgbench(db, scripts[case], clients=clients,
                                    duration=args.pg_duration, run=pg_run_no,
                                    quiet_wait=args.wait_quiet)
                    if r is None:
                        continue
                    pg_runs[case][clients].append(r)
                    log(f"  pgbench c={clients}: {r['tps']:.0f} tps, failed {r['failed']}, "
                        f"other processes {r['cpu']['other_pct']:.0f}% CPU")
        for case in ("random", "hot"):
            best = dict(max(api_runs[case], key=lambda r: r["rps"]))
            best["rounds"] = [r["rps"] for r in api_runs[case]]
            best["non_2xx_total"] = sum(r["non_2xx"] for r in api_runs[case])
            best["socket_errors_total"] = sum(r["socket_errors"] for r in api_runs[case])
            best["access_log_total"] = {}
            for r in api_runs[case]:
                for code, n in r["access_log"].items():
                    best["access_log_total"][code] = best["access_log_total"].get(code, 0) + n
            best["rows_total"] = sum(r["rows_written"] for r in api_runs[case])
            best["requests_total"] = sum(r["requests"] for r in api_runs[case])
            res["api"][case] = best
            res["pg"][case] = []
            for clients in pg_clients:
                if not pg_runs[case][clients]:
                    res["pg"][case].append({"clients": clients, "tps": 0.0, "rounds": [],
                                            "failed_total": 0, "skipped": True})
                    continue
                top = dict(max(pg_runs[case][clients], key=lambda r: r["tps"]))
                top["rounds"] = [r["tps"] for r in pg_runs[case][clients]]
                top["failed_total"] = sum(r["failed"] for r in pg_runs[case][clients])
                res["pg"][case].append(top)
        res["pg_best"] = {c: max(res["pg"][c], key=lambda r: r["tps"]) for c in res["pg"]}
        if not all(r["tps"] > 0 for r in res["pg_best"].values()):
            raise SystemExit("pgbench could not run at any client count")

        if args.sweep:
            res["sweep"] = sweep(args, base_env, workdir, db, api_key, run_id)

        for case in ("random", "hot"):
            ratio = res["api"][case]["rps"] / res["pg_best"][case]["tps"]
            log(f"{CASE_NAMES[case]}: API {res['api'][case]['rps']:.0f} req/s / pgbench "
                f"{res['pg_best'][case]['tps']:.0f} tps = {ratio:.2f} (target "
                f">= {TARGETS[case]}: {'met' if ratio >= TARGETS[case] else 'NOT met'})")
        saved = ROOT / "var" / "bench" / f"bench_write-{time.strftime('%Y%m%d-%H%M%S')}.json"
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(res, indent=1, default=str))
        log(f"raw results: {saved.relative_to(ROOT)} (re-render with --render FILE)")
        if not args.no_doc:
            write_doc(res)
            log(f"wrote {DOC.relative_to(ROOT)}")
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            log(f"kept database {args.db} and {workdir}")
        else:
            with contextlib.suppress(Exception):
                drop_database(admin, args.db)
            shutil.rmtree(workdir, ignore_errors=True)
        log(f"done in {time.monotonic() - started:.0f} s")
    return 0


def sweep(args, base_env: dict, workdir: Path, db: str, api_key: str, run_id: str) -> list:
    """Each gunicorn setting served afresh, --rounds times round-robin; best round counts."""
    # (class, workers, threads, TXMON_HTTP_CONCURRENCY); the limit is left off (0) where the
    # class bounds concurrency itself (sync: 1, gthread: its threads).
    settings = [("gthread", w, t, 0) for w, t in ((2, 1), (4, 1), (2, 4), (4, 4))]
    settings += [("sync", w, 1, 0) for w in (2, 4)]
    settings += [("gevent", w, 1, c) for w in (2, 4) for c in (0, 1, 2, 4)]
    runs: dict = {k: {"random": [], "hot": []} for k in range(len(settings))}
    for rnd in range(1, args.rounds + 1):
        for k, (cls, workers, threads, limit) in enumerate(settings):
            env = dict(base_env, TXMON_WORKER_CLASS=cls, TXMON_WEB_WORKERS=str(workers),
                       TXMON_WEB_THREADS=str(threads), TXMON_HTTP_CONCURRENCY=str(limit))
            server = Server(env, workdir, f"sweep{k}r{rnd}")
            try:
                server.start()
                got = {case: api_case(server, db, case=case, run_id=f"{run_id}s{k}r{rnd}",
                                      duration=args.sweep_duration,
                                      connections=args.connections, threads=args.wrk_threads,
                                      api_key=api_key, warmup=min(args.warmup, 2),
                                      quiet_wait=args.wait_quiet)
                       for case in ("random", "hot")}
            except (Exception, SystemExit) as exc:  # one bad setting must not lose the rest
                log(f"sweep round {rnd}: {cls} {workers}x{threads} limit {limit} failed, "
                    f"skipped: {exc}")
                continue
            finally:
                server.stop()
            for case in ("random", "hot"):
                runs[k][case].append(got[case])
            log(f"sweep round {rnd}: {cls} {workers}x{threads} limit {limit}: "
                f"{got['random']['rps']:.0f} req/s (1,000), {got['hot']['rps']:.0f} req/s "
                f"(hot), other processes {got['random']['cpu']['other_pct']:.0f}% CPU")
    rows = []
    for k, (cls, workers, threads, limit) in enumerate(settings):
        if not runs[k]["random"]:
            continue
        row = {"settings": {"worker_class": cls, "workers": workers, "threads": threads,
                            "http_concurrency": limit}}
        for case in ("random", "hot"):
            row[case] = dict(max(runs[k][case], key=lambda r: r["rps"]))
            row[case]["rounds"] = [r["rps"] for r in runs[k][case]]
            row[case]["non_2xx"] = sum(r["non_2xx"] for r in runs[k][case])
            row[case]["other_pcts"] = [r["cpu"]["other_pct"] for r in runs[k][case]]
            row[case]["cpu_ms_min"] = min(
                (r["cpu"]["app_ms_per_req"] or 0) + (r["cpu"]["postgres_ms_per_req"] or 0)
                for r in runs[k][case])
        rows.append(row)
    return rows


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
