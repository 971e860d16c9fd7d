"""What the benchmark scripts share: /proc readings, the Postgres admin URL, free ports.

Imported by scripts/bench_write.py, bench_worker.py and bench_ws.py (they run with scripts/
on sys.path). Each keeps its own CPU sampler: they split the machine's CPU into different
roles.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
# A Postgres backend's process title: "postgres: [cluster: ]user database host(port) ...".
BACKEND = re.compile(r"postgres: (?:[^:]*: )?\S+ (\S+) (?:\S+\(\d+\)|\[local\])")


def proc_stat(pid: str) -> tuple[str, int, int]:
    """(comm, ppid, utime + stime in ticks) of a process, from /proc/<pid>/stat."""
    raw = Path("/proc", pid, "stat").read_text()
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    return comm, int(fields[1]), int(fields[11]) + int(fields[12])


def busy_ticks() -> tuple[int, int]:
    """(all busy ticks, of which irq + softirq + steal: time no process is charged)."""
    cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(cpu) - cpu[3] - cpu[4], cpu[5] + cpu[6] + cpu[7]


def backend_database(pid: int, cache: dict[int, str]) -> str | None:
    """The database a Postgres backend serves, None for the server's own processes
    (``cache`` keeps command lines already read)."""
    if pid not in cache:
        with contextlib.suppress(OSError):
            cache[pid] = Path("/proc", str(pid), "cmdline").read_text()
    m = BACKEND.match(cache.get(pid, ""))
    return m.group(1) if m else None


def admin_url() -> str:
    """A superuser URL on the server to use: TXMON_BENCH_PG_ADMIN_URL, DATABASE_URL's, local."""
    url = os.environ.get("TXMON_BENCH_PG_ADMIN_URL")
    if url:
        return url
    db_url = os.environ.get("DATABASE_URL", "")
    if db_url.startswith(("postgres://", "postgresql://", "postgresql+psycopg://")):
        db_url = re.sub(r"^postgres(ql)?(\+psycopg)?://", "postgresql://", db_url)
        return db_url.split("?", 1)[0].rsplit("/", 1)[0] + "/postgres"
    return "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
