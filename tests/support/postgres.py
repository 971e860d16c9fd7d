"""A private PostgreSQL cluster (initdb + pg_ctl in a temporary directory, a free port) for
tests that must stop the database under traffic: the machine's shared server is never touched.

Postgres refuses to run as root; when the tests run as root the cluster runs as the
``postgres`` system user (runuser).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.common import free_port, strict, wait_until


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        path = shutil.which("pg_ctl")
        if path is None:
            text = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
            if strict():
                pytest.fail(text, pytrace=False)
            pytest.skip(text)
        return Path(path).parent
    return Path(found[-1]).parent


class PostgresCluster:
    """initdb'd once; ``start``/``stop`` as often as a test needs; ``destroy`` at the end."""

    def __init__(self):
        self.bin = _bindir()
        # Not under pytest's tmp_path: the postgres user must reach it (pytest's is 0700).
        self.root = Path(tempfile.mkdtemp(prefix="txmon-pg-"))
        self.dir, self.log = self.root / "pgdata", self.root / "postgres.log"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", self.dir, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args) -> None:
        argv = [*self.as_user, str(self.bin / tool), *map(str, args)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{tool} failed:\n{done.stdout}\n{done.stderr}"

    def start(self) -> None:
        self._run("pg_ctl", "-D", self.dir, "-l", self.log, "-w", "-t", "60", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories="
                  f"{self.dir} -c fsync=off", "start")
        wait_until(self.answers, 30, message=f"private postgres on :{self.port}")

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: every connection dropped at once, as a crash)."""
        self._run("pg_ctl", "-D", self.dir, "-m", mode, "-w", "stop")

    def answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres "
                                 "dbname=postgres connect_timeout=2"):
                return True
        except psycopg.Error:
            return False

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop()
        except AssertionError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)
