"""The Celery app on Redis: ``celery -A worker_service.celery_app worker`` (and ``beat``).

Tasks run inside the Flask app's context, so they share shared/'s config, models and
services with the API. One module per task family under worker_service/tasks/. Outbox
handlers take their queues from shared/outbox.py (one per channel and family, so a stuck
SMTP server never holds up pushes, alert checks or refunds); the periodic tasks run on
``outbox`` and ``reconcile``.
"""
from __future__ import annotations

from datetime import timedelta

from celery import Celery
from kombu import Queue

from flask import Flask

from shared import outbox

FAMILIES = ("outbox", "notifications", "email", "refunds", "alerts", "reconcile", "realtime")
TASK_MODULES = [f"worker_service.tasks.{family}" for family in FAMILIES]
QUEUES = ("default", "outbox", "reconcile", *outbox.QUEUES)
# Longer than the longest task may run (reconciliation: an hour), so Redis never hands a
# running task to a second worker; long waits are due times in the outbox, not countdowns.
VISIBILITY_TIMEOUT_S = 3600 + 300


def celery_config(flask_config: dict) -> dict:
    """Celery settings derived from the Flask app's configuration."""
    visibility = int(flask_config.get("CELERY_VISIBILITY_TIMEOUT_S", VISIBILITY_TIMEOUT_S))
    broker = flask_config.get("CELERY_BROKER_URL") or flask_config["REDIS_URL"]
    return {
        "broker_url": broker,
        # Redis brokers use kombu's transport with a restore fix (worker_service/broker.py).
        "broker_transport": ("worker_service.broker:Transport"
                             if broker.startswith(("redis://", "rediss://")) else None),
        "broker_transport_options": {"visibility_timeout": visibility},
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": int(flask_config.get("CELERY_PREFETCH", 4)),
        "task_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "task_default_queue": "default",
        "task_queues": [Queue(name) for name in QUEUES],
        "task_routes": {"txmon.outbox.sweep": {"queue": "outbox"},
                        "txmon.refunds.scan_expired": {"queue": "outbox"},
                        "txmon.refunds.expire_batch": {"queue": "refunds"},
                        "txmon.reconcile.run": {"queue": "reconcile"},
                        # short and periodic like the scans, never behind an hour-long run
                        "txmon.reconcile.monitor_rollups": {"queue": "outbox"},
                        **{h.name: {"queue": h.queue} for h in outbox.HANDLERS.values()}},
        "task_time_limit": 120,
        "task_soft_time_limit": 100,
        "worker_send_task_events": True,
        "task_send_sent_event": False,  # costs the relay ~0.15 ms per dispatch (measured)
        "beat_schedule": {
            "outbox-sweep": {"task": "txmon.outbox.sweep", "schedule": 5.0},
            "refunds-scan": {"task": "txmon.refunds.scan_expired", "schedule": 10.0},
            "reconcile-hourly": {"task": "txmon.reconcile.run", "schedule": timedelta(hours=1)},
            "monitor-rollups": {"task": "txmon.reconcile.monitor_rollups", "schedule": 30.0},
            "outbox-purge": {"task": "txmon.outbox.purge", "schedule": timedelta(hours=1)},
        },
    }


def make_celery(flask_app) -> Celery:
    """A Celery app bound to ``flask_app``; the base task gives every run an app context."""
    app = Celery("txmon", include=TASK_MODULES, task_cls="worker_service.base:TxmonTask")
    app.conf.update(celery_config(flask_app.config))
    app.flask_app = flask_app
    flask_app.extensions["celery"] = app
    from worker_service import relay, worker_metrics

    app.steps["worker"].add(relay.OutboxRelayStep)
    worker_metrics.install(app)
    _freeze_when_started()
    return app


def _freeze_when_started() -> None:
    """Once a worker's main process is ready, and in each pool child as it starts, move every
    object alive then (modules, the app, Celery's and kombu's machinery) out of the garbage
    collector's reach (``gc.freeze``). A full collection of the main process walked all of
    them and stopped its threads, the outbox relay included, for 80-140 ms (measured with
    a gc callback under scripts/bench_ws): a stall every balance update in flight waited
    out. After, full collections there took about 6 ms."""
    import gc

    from celery import signals

    def freeze(**_):
        gc.freeze()

    signals.worker_ready.connect(freeze, weak=False, dispatch_uid="txmon-gc-freeze-main")
    signals.worker_process_init.connect(freeze, weak=False,
                                        dispatch_uid="txmon-gc-freeze-child")


def create_worker_app(test_config: dict | None = None) -> Flask:
    """The Flask app tasks run in: txmon's configuration and database, without the HTTP
    service's routes, schemas and extensions (importing those cost every worker start
    ~0.5 s, measured with -X importtime; tasks use only ``current_app.config`` and ``db``)."""
    import logging

    from shared.config import Config, engine_options
    from shared.db import db

    app = Flask(__name__)
    app.config.update(Config().as_dict())
    if test_config:
        app.config.update(test_config)
    if not (test_config and "SQLALCHEMY_ENGINE_OPTIONS" in test_config):
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(
            app.config["SQLALCHEMY_DATABASE_URI"])
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    db.init_app(app)
    return app


flask_app = create_worker_app()
celery = make_celery(flask_app)
app = celery
