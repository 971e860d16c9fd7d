"""The basics every test helper builds on: polling, ports, required tools, processes, Redis.

No assertion in the suite depends on how fast something happened: ``wait_until`` bounds a
wait with a generous deadline and fails with the state it last saw.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"


def wait_until(predicate, timeout: float = 30.0, *, interval: float = 0.1, message=""):
    """Poll ``predicate`` until it returns something truthy; return that.

    Raises AssertionError after ``timeout`` seconds (a bound on the wait, never an assertion on
    speed). ``message`` may be a callable, evaluated on failure to show the state then. An
    AssertionError raised by ``predicate`` fails at once (e.g. the process being waited on
    exited); any other exception is a transient answer and polling goes on.
    """
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = predicate()
        except AssertionError:
            raise
        except Exception as exc:
            value, last_exc = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            if callable(message):
                message = message()
            raise AssertionError(f"gave up after {timeout:.0f}s waiting for: "
                                 f"{message or getattr(predicate, '__name__', predicate)}"
                                 f"{detail}")
        time.sleep(interval)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strict() -> bool:
    """In CI (``CI`` or ``TXMON_TEST_STRICT`` set) a missing tool fails instead of skipping."""
    return any(os.environ.get(v, "").lower() not in ("", "0", "false")
               for v in ("CI", "TXMON_TEST_STRICT"))


def require_tool(name: str, hint: str) -> str:
    """The path of executable ``name``; skip without it locally, fail without it in CI."""
    path = shutil.which(name)
    if path is None:
        text = f"{name} is not installed ({hint})"
        if strict():
            pytest.fail(text + "; CI must have it (.ci/run installs it)", pytrace=False)
        pytest.skip(text)
    return path


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the test process dies without tearing down."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. a prefork pool's ForkPoolWorker processes)."""
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(p) for p in f.read().split()]
    except FileNotFoundError:
        pass
    return sorted(set(found))


def clean_env(**values) -> dict:
    """os.environ without the project's settings, plus ``values`` (as strings).

    The base of every subprocess environment: nothing of the developer's shell (a
    DATABASE_URL, a PROMETHEUS_MULTIPROC_DIR) leaks into a process under test.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TXMON_", "PROMETHEUS_", "CELERY_", "GUNICORN"))
           and k not in ("DATABASE_URL", "REDIS_URL", "SMTP_URL", "PORT")}
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    env.update({k: str(v) for k, v in values.items()})
    return env


def app_env(app, database_url: str, redis_url: str, tmp: Path, **values) -> dict:
    """The environment of an API or worker process serving the test database: the app's
    secrets and alert thresholds, a Redis, a metrics directory of its own."""
    prom = tmp / f"prom-{os.urandom(3).hex()}"
    prom.mkdir(parents=True)
    return clean_env(
        DATABASE_URL=database_url, REDIS_URL=redis_url,
        TXMON_SERVICE_KEYS=",".join(app.config["SERVICE_KEYS"]),
        TXMON_JWT_SECRET=app.config["JWT_SECRET"],
        PROMETHEUS_MULTIPROC_DIR=prom, TXMON_MAIL_DIR=tmp / "mail",
        TXMON_ALERT_LARGE_DEBIT_CENTS=app.config["ALERT_LARGE_DEBIT_CENTS"],
        TXMON_ALERT_RAPID_COUNT=app.config["ALERT_RAPID_COUNT"],
        TXMON_ALERT_RAPID_WINDOW_S=app.config["ALERT_RAPID_WINDOW_S"],
        **values)


class Process:
    """A child in its own process group, output to files; stop() kills the whole group."""

    def __init__(self, name: str, argv: list[str], env: dict, logdir: Path):
        self.name = name
        self.stdout_path = logdir / f"{name}.stdout.log"
        self.stderr_path = logdir / f"{name}.stderr.log"
        self._out = open(self.stdout_path, "ab")
        self._err = open(self.stderr_path, "ab")
        self.popen = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self._out,
                                      stderr=self._err, stdin=subprocess.DEVNULL,
                                      start_new_session=True, preexec_fn=die_with_parent)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything the process wrote so far (stdout then stderr)."""
        for f in (self._out, self._err):
            if not f.closed:
                f.flush()
        return (self.stdout_path.read_text(errors="replace")
                + self.stderr_path.read_text(errors="replace"))

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def signal_group(self, sig) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig=signal.SIGTERM, grace: float = 8.0) -> None:
        """Signal the process group, wait ``grace`` seconds, then SIGKILL what is left."""
        if self.alive():
            self.signal_group(sig)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # stragglers (forked children) too
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()
        self._err.close()


class RedisServer:
    """A private redis-server on a free loopback port that keeps nothing on disk.

    Stopping it loses every queued message, as a broker outage without persistence does;
    it starts again, empty, on the same port.
    """

    def __init__(self, workdir: Path):
        self.dir, self.port = workdir, free_port()
        self.proc: Process | None = None
        self.starts = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5,
                           socket_connect_timeout=2)

    def ping(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except Exception:
            return False

    def start(self) -> None:
        assert self.proc is None or not self.proc.alive()
        binary = require_tool("redis-server", "apt-get install redis-server")
        self.starts += 1
        self.proc = Process(f"redis-{self.starts}", [
            binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
            "--save", "", "--appendonly", "no", "--loglevel", "warning"],
            clean_env(), self.dir)

        def up():
            assert self.proc.alive(), f"redis-server exited:\n{self.proc.tail()}"
            return self.ping()

        wait_until(up, 20, message=f"redis-server on :{self.port}")

    def stop(self) -> None:
        """SIGTERM and wait until it no longer answers; what it held is gone."""
        if self.proc is not None:
            self.proc.stop(grace=20)
        wait_until(lambda: not self.ping(), 10, message="redis to stop answering")

    def kill(self) -> None:
        """Crash it (SIGKILL): every client connection drops at once."""
        if self.proc is not None:
            self.proc.stop(sig=signal.SIGKILL, grace=5)

    def unacked(self) -> list[tuple[str, dict]]:
        """(task name, kwargs) of every message kombu holds in its ``unacked`` hash: taken
        by a worker and not acknowledged; Redis hands them out again only after the
        visibility timeout."""
        import base64
        import json

        found = []
        with self.client() as c:
            values = c.hvals("unacked")
        for raw in values:
            message = json.loads(raw)[0]
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)
            found.append((message["headers"]["task"], args[1] if len(args) > 1 else {}))
        return found

    def unacked_ids(self) -> set[str]:
        """Task ids in kombu's ``unacked`` hash: only those can be delivered again."""
        import json

        with self.client() as c:
            return {json.loads(raw)[0]["headers"]["id"] for raw in c.hvals("unacked")}


def start_gunicorn(app, database_url: str, tmp: Path, *, workers: int, redis_url: str,
                   name: str = "gunicorn", **values) -> tuple[Process, str]:
    """gunicorn as scripts/run serves the API (gunicorn.conf.py) on a free port against the
    test database and ``redis_url``; returns (process, base URL) once /healthz answers."""
    import requests

    port = free_port()
    env = app_env(app, database_url, redis_url, tmp, PORT=port, TXMON_WEB_WORKERS=workers,
                  TXMON_PUBLIC_URL=f"http://127.0.0.1:{port}", **values)
    # --no-control-socket: gunicorn's default control socket is one path per machine, and a
    # test server must not take it from a gunicorn someone else runs here.
    proc = Process(name, [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py",
                          "--no-control-socket", "api_service.wsgi:app"], env, tmp)
    base = f"http://127.0.0.1:{port}"

    def up():
        assert proc.alive(), f"gunicorn exited:\n{proc.tail()}"
        return requests.get(base + "/healthz", timeout=2).status_code == 200

    try:
        wait_until(up, 60, message=lambda: f"gunicorn /healthz; output:\n{proc.tail()}")
    except BaseException:
        proc.stop(grace=2)
        raise
    return proc, base
