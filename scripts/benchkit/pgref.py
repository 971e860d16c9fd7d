"""The pgbench reference: the statements one real purchase executes, replayed by pgbench.

``capture`` (in a child process) makes one real POST /api/v1/verifications through the Flask
app on the benchmark's database, recording every statement psycopg sends between BEGIN and
COMMIT with its parameters and RETURNING row (by wrapping psycopg's cursor, so SQLAlchemy and
raw psycopg alike). ``PgbenchScript`` turns that into a pgbench script: the same statement
text, order, transaction and round trips (one message or a psycopg pipeline: pgbench
pipelines), RETURNING values fed to later statements with ``\\gset``, the user and the
verification id as pgbench variables.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_RUNS = itertools.count(1)


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
                                     "cost_cents": 1, "timeout_seconds": args.timeout})
        if response.status_code != 201:
            raise SystemExit(f"capture request failed: {response.status_code} "
                             f"{response.get_data(as_text=True)}")
    Path(args.out).write_text(json.dumps({"events": events, "user_id": args.user,
                                          "verification_id": f"capture-{tag}-2",
                                          "response": response.get_json()}, indent=1))


def capture(db_url: str, user: str, out: Path, timeout_s: int = 300) -> dict:
    subprocess.run([sys.executable, "-m", "benchkit.pgref", "--db-url", db_url, "--user", user,
                    "--out", str(out), "--timeout", str(timeout_s)], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=f"{ROOT / 'scripts'}:{ROOT}"))
    return json.loads(out.read_text())


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
        if kind == "json" or (kind == "str" and value.startswith("{")):  # ids in a payload
            text, subs = _quote(value), {re.escape(self.capture["verification_id"]): ":vid"}
            for table, column, returned in self.returned:
                if column in RETURNED_IDS:
                    subs[rf"(?<=: ){returned}(?=[,}}])"] = f":{table}_{column}"
            for pattern, var in subs.items():
                text, n = re.subn(pattern, f"' || {var} || '", text)
                if n and var == ":vid":
                    self._var(var)
            return text if text == _quote(value) else f"({text})::json"
        if kind == "str":
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

    def write(self, path: Path, user_lo: int, user_hi: int) -> str:
        text = ("-- generated by scripts/bench from the statements of one real "
                "POST /api/v1/verifications\n"
                f"\\set uid random({user_lo}, {user_hi})\n"
                "\\set vid 1000000000000000 * :run + 1000000000000 * :client_id"
                " + random(1, 999999999999)\n" + self.body())
        path.write_text(text)
        return text


def pgbench(db_url: str, script: Path, *, clients: int = 16, seconds: float = 10,
            transactions: int | None = None) -> dict:
    """pgbench -M prepared with ``script`` for ``seconds`` (or ``transactions`` in all):
    {"tps", "transactions", "command"}."""
    run = next(_RUNS)  # part of each verification id: unique across the runs
    length = (["-t", str(max(1, transactions // clients))] if transactions
              else ["-T", f"{seconds:g}"])
    cmd = ["pgbench", "-n", "-M", "prepared", "-f", str(script), "-c", str(clients),
           "-j", str(min(2, clients)), *length, "-D", f"run={run}", db_url]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    tps = re.search(r"^tps = ([\d.]+) \(without initial connection time\)", out, re.M)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    if proc.returncode != 0 or not tps or "aborted" in out:
        raise SystemExit(f"pgbench failed ({' '.join(cmd)}):\n{out[-3000:]}")
    return {"tps": float(tps.group(1)), "transactions": int(done.group(1)),
            "command": " ".join(cmd[:-1])}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db-url", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=int, default=300)
    capture_main(parser.parse_args())


def script_for(stack, users: list[str], timeout_s: int = 300) -> Path:
    """Capture one real purchase on ``stack``'s database (as ``users[0]``) and write the
    pgbench script over all ``users``."""
    tag = f"{timeout_s}"
    capture_json = capture(stack.db_url, users[0], stack.tmp / f"capture-{tag}.json", timeout_s)
    script = stack.tmp / f"purchase-{tag}.sql"
    PgbenchScript(capture_json).write(script, int(users[0]), int(users[-1]))
    return script


def reference(stack, script: Path, *, clients: int = 16, seconds: float = 10,
              transactions: int | None = None, settle: bool = True) -> dict:
    """pgbench with the worker and beat paused: the database's own rate on the purchase SQL.
    ``settle``: the follow-ups its purchases wrote are marked done (they reference the
    captured notification's content, not worth delivering)."""
    with stack.paused():
        result = pgbench(stack.db_url, script, clients=clients, seconds=seconds,
                         transactions=transactions)
        if settle:
            stack.settle()
    return result

