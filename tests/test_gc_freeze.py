"""Start-up objects are frozen out of the garbage collector's full collections.

A full collection in an API worker or in the Celery worker's main process walked every
object loaded at start-up and stalled the process for 80-205 ms (docs/DECISIONS.md). The
API freezes them once the app is loaded (gunicorn.conf.py ``post_worker_init``), the worker
once it is ready and in each pool child as it starts (worker_service/celery_app.py).
"""
from __future__ import annotations

import gc
import importlib
import runpy
from types import SimpleNamespace

import pytest

from tests.support import ROOT


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()


def test_api_worker_freezes_after_loading_the_app(unfrozen):
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    conf["post_worker_init"](SimpleNamespace())  # any worker class
    assert gc.get_freeze_count() > 0


@pytest.mark.parametrize("signal_name", ["worker_ready", "worker_process_init"])
def test_celery_worker_freezes_when_ready_and_in_each_pool_child(unfrozen, signal_name):
    from celery import signals

    importlib.import_module("worker_service.celery_app")  # connects the receivers

    getattr(signals, signal_name).send(sender=None)
    assert gc.get_freeze_count() > 0
