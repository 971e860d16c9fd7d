"""Everything the test modules share: one place for helpers, launchers and the checker.

- ``common``: ``wait_until``, ``free_port``, required tools (fail in CI, skip locally),
  process groups, a private ``RedisServer`` that keeps nothing, ``start_gunicorn``,
  environment builders.
- ``api``: ``Api`` (the app as its clients call it), ``assert_error``, ``ok``.
- ``invariants``: the independent checker of DESIGN.md's invariants and delivery guarantees.
- ``workers``: fixtures ``redis_server``, ``smtp``, ``workers``, ``beat``, ``celery_client``
  (loaded for every test module by tests/conftest.py) and the Celery worker launcher.
- ``stack``: gunicorn + Celery worker + Redis for the websocket tests, and the websocket client.

Test modules import from here only, never from one another.
"""
from tests.support.api import Api, assert_error, ok
from tests.support.common import (ROOT, RedisServer, free_port, require_tool, start_gunicorn,
                                  wait_until)
from tests.support.invariants import invariant_violations

__all__ = ["Api", "ROOT", "RedisServer", "assert_error", "free_port", "invariant_violations",
           "ok", "require_tool", "start_gunicorn", "wait_until"]
