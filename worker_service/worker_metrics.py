"""Worker metrics on :9808/metrics (prometheus_client multiprocess mode under prefork)."""
from __future__ import annotations

import logging
import os

from celery import signals
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger("txmon.worker")

TASK_RUNS = Counter("worker_task_runs_total", "Task runs by outcome", ["task", "outcome"])
TASK_SECONDS = Histogram("worker_task_seconds", "Task run time", ["task"])


def _serve_metrics(port: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(port, addr=os.environ.get("TXMON_WORKER_METRICS_ADDR", "127.0.0.1"),
                          registry=registry)
    else:
        start_http_server(port, addr=os.environ.get("TXMON_WORKER_METRICS_ADDR", "127.0.0.1"))
    log.info("Worker metrics on :%s/metrics", port)


def install(app) -> None:
    """Serve metrics from the worker's main process; give each forked child its own pool;
    start workers without mingle."""

    @signals.worker_init.connect(weak=False)
    def _worker_init(sender=None, **_):
        # No mingle at start-up: it waits a full second for other workers to share revoked
        # task ids and clocks, and txmon revokes nothing (TXMON_WORKER_MINGLE=1 restores it).
        if sender is not None and os.environ.get("TXMON_WORKER_MINGLE", "0") != "1":
            sender.options["without_mingle"] = True
        if sender is not None and getattr(sender, "concurrency", None):
            # The pool's size, for the batch lanes of its children (tasks/outbox.py).
            os.environ["TXMON_POOL_SIZE"] = str(sender.concurrency)
        port = int(os.environ.get("TXMON_WORKER_METRICS_PORT", "9808"))
        if port:
            try:
                _serve_metrics(port)
            except OSError as exc:  # another worker on this host already serves it
                log.warning("Worker metrics port %s unavailable: %s", port, exc)

    @signals.worker_process_init.connect(weak=False)
    def _child_init(**_):
        from shared.db import db

        with app.flask_app.app_context():
            db.engine.dispose(close=False)  # never share the parent's sockets

    @signals.worker_process_shutdown.connect(weak=False)
    def _child_exit(pid=None, **_):
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid or os.getpid())
