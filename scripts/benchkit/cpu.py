"""CPU time per process role, from /proc: each process's utime + stime at the start and
every 0.25 s after (a process that exits between two samples loses at most its last 0.25 s),
and the machine's idle and steal from /proc/stat."""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROLES = ("api", "worker", "beat", "flower", "postgres", "redis", "smtp server",
         "load generator", "log pipes")
# A Postgres backend's title: "postgres: [cluster: ]user database host(port) ...".
_BACKEND = re.compile(r"postgres: (?:[^:]*: )?\S+ (\S+) (?:\S+\(\d+\)|\[local\])")
_BY_CMDLINE = (("gunicorn", "api"), ("celery", None), ("redis-server", "redis"),
               ("benchkit.smtpsink", "smtp server"))


def role(cmd: str, comm: str, ancestors: set[int], run_pid: int | None, self_pid: int,
         dbname: str) -> str:
    """The role of one process, from its command line and whose descendant it is."""
    if comm in ("wrk", "pgbench"):
        return "load generator"
    if cmd.startswith("postgres:"):
        m = _BACKEND.match(cmd)
        return "postgres" if m and m.group(1) == dbname else "other"
    if run_pid is not None and (run_pid in ancestors):
        for needle, name in _BY_CMDLINE:
            if needle in cmd:
                if name:
                    return name
                return next((r for r in ("beat", "flower") if f" {r}" in cmd), "worker")
        return "log pipes"  # scripts/run itself, its tee and awk prefixers, its probes
    if self_pid in ancestors:
        return "smtp server" if "benchkit.smtpsink" in cmd else "load generator"
    return "other"


def role_seconds(first: dict[int, int], last: dict[int, tuple[str, int]]) -> dict[str, float]:
    """Seconds of CPU per role between two samples; a pid absent from ``first`` started
    during the window and counts from zero."""
    out = dict.fromkeys(ROLES, 0.0)
    for pid, (name, ticks) in last.items():
        if name in out:
            out[name] += (ticks - first.get(pid, 0)) / CLK_TCK
    return out


def machine(stat0: list[int], stat1: list[int]) -> dict[str, float]:
    """Busy, idle (idle + iowait) and steal as % of all CPUs, from two /proc/stat cpu lines
    (user nice system idle iowait irq softirq steal)."""
    d = [b - a for a, b in zip(stat0[:8], stat1[:8])]
    total = sum(d) or 1
    return {"idle_pct": 100 * (d[3] + d[4]) / total, "steal_pct": 100 * d[7] / total,
            "busy_pct": 100 * (total - d[3] - d[4]) / total,
            "cpu_seconds": total / CLK_TCK}


def cpu_line() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def processes() -> dict[int, tuple[str, int, int, str]]:
    """pid -> (comm, ppid, utime + stime ticks, command line)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path("/proc", entry.name, "stat").read_text()
            cmd = Path("/proc", entry.name, "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(entry.name)] = (raw[raw.index("(") + 1:raw.rindex(")")], int(fields[1]),
                                int(fields[11]) + int(fields[12]), cmd.decode(errors="replace"))
    return out


class Cpu(threading.Thread):
    """``with Cpu(run_pid, dbname) as cpu: ...``; then ``cpu.per(n)`` is ms of CPU per item
    by role, plus the machine's busy, idle and steal %."""

    def __init__(self, run_pid: int | None, dbname: str):
        super().__init__(daemon=True)
        self.run_pid, self.dbname, self.self_pid = run_pid, dbname, os.getpid()
        self.first: dict[int, int] = {}
        self.last: dict[int, tuple[str, int]] = {}
        self.roles: dict[int, str] = {}
        self.stop = threading.Event()

    def sample(self) -> dict[int, tuple[str, int]]:
        procs = processes()
        for pid, (comm, _, ticks, cmd) in procs.items():
            if pid not in self.roles or self.roles[pid] == "log pipes":  # exec may follow
                ancestors, p = set(), pid
                while p in procs and p > 1 and len(ancestors) < 64:
                    ancestors.add(p)
                    p = procs[p][1]
                self.roles[pid] = role(cmd, comm, ancestors, self.run_pid, self.self_pid,
                                       self.dbname)
            self.last[pid] = (self.roles[pid], ticks)
        return {pid: (self.roles[pid], procs[pid][2]) for pid in procs}

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.sample()

    def __enter__(self):
        self.stat0 = cpu_line()
        self.first = {pid: ticks for pid, (_, ticks) in self.sample().items()}
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()
        self.sample()
        self.seconds = role_seconds(self.first, self.last)
        self.machine = machine(self.stat0, cpu_line())
        busy_s = self.machine["busy_pct"] * self.machine["cpu_seconds"] / 100
        self.machine["other_pct"] = max(0.0, 100 * (busy_s - sum(self.seconds.values()))
                                        / (self.machine["cpu_seconds"] or 1))
        return False

    def per(self, count: int) -> dict[str, float]:
        out = {r: 1000 * s / count for r, s in self.seconds.items()} if count else {}
        return {**out, **{k: v for k, v in self.machine.items() if k.endswith("_pct")}}
