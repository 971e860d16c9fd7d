"""The API under gunicorn as scripts/run serves it: it says where it listens, and Ctrl-C
stops it cleanly (gunicorn.conf.py ``when_ready``, ``post_fork`` and ``worker_exit``); a
graceful stop closes every websocket with 1001.

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
from tests.support.stack import Sockets, connections_by_worker, running_stack, uid


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


def test_sigterm__every_websocket_closed_1001__workers_exit_without_the_graceful_timeout(
        app, database_url, tmp_path_factory):
    """A graceful stop (SIGTERM, as a deploy or `docker stop` sends) closes each socket with
    1001 so its client reconnects with since_seq to a worker that is up; without that a
    socket never ends, and each worker sat out its graceful_timeout, then dropped them."""
    with running_stack(app, database_url, tmp_path_factory, "sigterm", web_workers=2) as stack:
        user = uid("bye")
        stack.account(user, 1000)
        sockets = Sockets(stack)
        try:
            clients = [sockets.balance(stack.token(user)) for _ in range(3)]
            clients.append(sockets.admin(stack.token("ops", admin=True)))
            assert [c.recv()["type"] for c in clients] == ["snapshot"] * 3 + ["hello"]
            served = connections_by_worker(stack, clients)
            assert sum(w["sockets"] for w in served.values()) == 4, served

            # An idle keep-alive connection still holds its worker until graceful_timeout
            # (gevent's server has no idle timeout); the main app's pool would do the same.
            stack.close_http()
            stack.api_proc.signal_group(signal.SIGTERM)
            closes = [c.expect_close(30) for c in clients]
            assert [c.code for c in closes] == [1001] * 4, closes
            assert all("since_seq" in c.reason for c in closes), closes
            code = stack.api_proc.popen.wait(timeout=30)
        finally:
            sockets.close_all()
        output = stack.api_proc.output()
        assert code == 0, output[-3000:]
        assert "Worker graceful timeout" not in output, output[-3000:]
        assert output.count("Worker exiting") == 2, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
