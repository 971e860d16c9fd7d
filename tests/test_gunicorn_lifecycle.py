"""The API under gunicorn as scripts/run serves it: it says where it listens, and Ctrl-C
stops it cleanly (gunicorn.conf.py ``when_ready``, ``post_fork`` and ``worker_exit``).

With reuse_port, gunicorn's own "Listening at:" line named no address. A terminal's Ctrl-C
sends SIGINT to every process of its group: the gunicorn master and each worker. The master
then sends each worker SIGQUIT as well. Without the hooks, a gevent worker printed a
SystemExit traceback as it quit, nearly every time.
"""
from __future__ import annotations

import os
import signal

import requests

from tests.support import start_gunicorn


def test_says_where_it_listens__ctrl_c_quits_every_process_without_a_traceback(
        app, database_url, redis_server, tmp_path):
    proc, base = start_gunicorn(app, database_url, tmp_path, workers=2,
                                redis_url=redis_server.url(), TXMON_WORKER_CLASS="gevent")
    try:
        # Every worker serving: each request comes on a new connection, which the kernel
        # hands to one of the workers' own listening sockets (reuse_port); a worker
        # answers only once it runs, i.e. after its start-up.
        for _ in range(24):
            assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = proc.popen.wait(timeout=30)
    finally:
        proc.stop(sig=signal.SIGKILL, grace=0)
    output = proc.output()
    assert code == 0, output[-3000:]
    assert output.count("Worker exiting") == 2, output[-3000:]
    assert "Traceback" not in output and "SystemExit" not in output, output[-3000:]
    assert "Shutting down: Master" in output
    assert f"Listening at: {base} " in output, output[:2000]
