"""Database round trips in a gevent worker whose descriptors are past 1024.

A gevent process holding thousands of websockets opens its database connections at file
descriptors above 1024. psycopg's wait function must cope there: its ``wait_select`` cannot
(gevent's select refuses such descriptors, and a failed wait leaves the connection with "another
command is already in progress"), which a benchmark with 6,000 sockets found. The child
process below gets the environment gunicorn.conf.py gives gevent workers, patches like
gunicorn's gevent worker, pushes its descriptors past 1024 and runs queries.

The app makes psycopg wait with ``shared.gevent_pg.wait_gevent`` under gevent; the second
child checks that it does, and that the wait is cooperative, pipelines work, a database
error comes through, and a wait with a deadline (LISTEN/NOTIFY) ends when it should.
"""
from __future__ import annotations

import os
import resource
import runpy
import subprocess
import sys

import pytest

from tests.support import ROOT


CHILD = r"""
from gevent import monkey
monkey.patch_all()
import os, sys
import psycopg
from shared import gevent_pg
assert gevent_pg.install()
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
    result = subprocess.run([sys.executable, "-c", CHILD, url], env=_gevent_worker_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            preexec_fn=_room_for_2048_descriptors)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


COOPERATIVE = r"""
from gevent import monkey
monkey.patch_all()
import sys, time
import gevent, psycopg, psycopg.waiting
from api_service import create_app
from shared.config import TestConfig
from shared.gevent_pg import wait_gevent

create_app(TestConfig(sys.argv[2]).as_dict())
assert psycopg.waiting.wait is wait_gevent, psycopg.waiting.wait

ticks = []
def ticker():
    while True:
        ticks.append(1)
        gevent.sleep(0.01)
t = gevent.spawn(ticker)
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    # Cooperative: the other greenlet runs while this one waits on the server (a blocking
    # wait would let it run not once).
    gevent.sleep(0)
    before = len(ticks)
    conn.execute("SELECT pg_sleep(0.5)")
    assert len(ticks) > before, (before, len(ticks))
    # A pipeline, as the ledger runs it, then an error raised through the wait.
    with conn.pipeline():
        conn.execute("BEGIN")
        cur = conn.execute("SELECT %s::int + 1", (41,))
        conn.execute("COMMIT")
    assert cur.fetchone()[0] == 42
    try:
        conn.execute("SELECT 1/0")
        raise AssertionError("no error")
    except psycopg.errors.DivisionByZero:
        pass
    # A wait with a deadline: notifies(timeout=...) returns after it, with nothing.
    conn.execute("LISTEN gevent_pg_test")
    assert list(conn.notifies(timeout=0.3)) == []  # it returns (the run's timeout bounds it)
    # And a notification sent meanwhile by another connection arrives.
    def notify():
        with psycopg.connect(sys.argv[1], autocommit=True) as other:
            other.execute("NOTIFY gevent_pg_test, 'hi'")
    gevent.spawn_later(0.1, notify)
    got = [n.payload for n in conn.notifies(timeout=5, stop_after=1)]
    assert got == ["hi"], got
t.kill()
print("ok", len(ticks))
"""


def test_app_installs_a_cooperative_wait_under_gevent(database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("Postgres only: SQLite has no socket to wait on")
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    result = subprocess.run([sys.executable, "-c", COOPERATIVE, url, database_url],
                            env=_gevent_worker_env(), capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
