"""The Celery app on Redis: ``celery -A worker_service.celery_app worker``.

Tasks run inside the Flask app's context (so they share shared/'s config, models and
services with the API). Task modules are listed in ``TASK_MODULES``, one per family.
"""
from __future__ import annotations

from celery import Celery, Task

from api_service import create_app

TASK_MODULES: list[str] = []


def make_celery(flask_app) -> Celery:
    """A Celery app bound to ``flask_app``: every task body runs in its app context."""

    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with flask_app.app_context():
                return self.run(*args, **kwargs)

    app = Celery("txmon", task_cls=FlaskTask, include=TASK_MODULES)
    app.conf.update(
        broker_url=flask_app.config["REDIS_URL"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        broker_connection_retry_on_startup=True,
    )
    flask_app.extensions["celery"] = app
    return app


flask_app = create_app()
celery = make_celery(flask_app)
app = celery
