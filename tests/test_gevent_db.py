"""Database round trips in a gevent worker whose descriptors are past 1024.

A gevent process holding thousands of websockets opens its database connections at file
descriptors above 1024. psycopg's wait function must cope there: its ``wait_select`` cannot
(gevent's select refuses such descriptors, and a failed wait leaves the connection with "another
command is already in progress"), which a benchmark with 6,000 sockets found. The child
process below gets the environment gunicorn.conf.py gives gevent workers, patches like
gunicorn's gevent worker, pushes its descriptors past 1024 and runs queries.
"""
from __future__ import annotations

import os
import resource
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
from gevent import monkey
monkey.patch_all()
import os, sys
import psycopg
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
with psycopg.connect(sys.argv[1]) as conn:
    fd = conn.fileno()
    assert fd > 1024, fd
    for i in range(20):
        assert conn.execute("SELECT %s::int", (i,)).fetchone()[0] == i
print("ok", fd)
"""


def _gevent_worker_env() -> dict:
    """os.environ as gunicorn.conf.py leaves it for TXMON_WORKER_CLASS=gevent."""
    saved = dict(os.environ)
    try:
        os.environ["TXMON_WORKER_CLASS"] = "gevent"
        runpy.run_path(str(ROOT / "gunicorn.conf.py"))
        return dict(os.environ)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _room_for_2048_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))


def test_queries_work_on_a_connection_past_fd_1024(database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("Postgres only: SQLite has no socket to wait on")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"open-files hard limit {hard}: no process here gets past fd 1024")
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    result = subprocess.run([sys.executable, "-c", CHILD, url], env=_gevent_worker_env(),
                            capture_output=True, text=True, timeout=60,
                            preexec_fn=_room_for_2048_descriptors)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
