"""Operations: liveness, readiness and the OpenAPI document."""
from __future__ import annotations

import threading
import time

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from api_service import schemas as s
from api_service.contract import openapi_document, operation
from shared import health
from shared.db import db
from shared.redis_client import client

bp = Blueprint("ops", __name__)
TAGS = ("operations",)


@bp.get("/healthz")
@operation("The process is up", auth_as=None, tags=TAGS, responses={200: s.StatusOut})
def healthz():
    return jsonify({"status": "ok", "checks": {}})


@bp.get("/readyz")
@operation("The database and Redis answer", auth_as=None, tags=TAGS,
           responses={200: s.StatusOut, 503: s.StatusOut})
def readyz():
    readiness = current_app.extensions.get("txmon_readiness")
    if readiness is None:
        readiness = current_app.extensions.setdefault("txmon_readiness", Readiness())
    body, status = readiness.result()
    return jsonify(body), status


class Readiness:
    """The last readiness check, reused for up to ``max_age`` seconds: a probe (or anyone)
    calling /readyz in a loop costs one database connection and one Redis ping a second."""

    def __init__(self, max_age: float = 1.0, clock=time.monotonic):
        self.max_age, self.clock = max_age, clock
        self.lock = threading.Lock()  # concurrent callers wait for one check, not run N
        self.checked_at: float | None = None
        self.last: tuple[dict, int] | None = None

    def result(self) -> tuple[dict, int]:
        with self.lock:
            now = self.clock()
            if self.checked_at is None or now - self.checked_at >= self.max_age:
                self.last, self.checked_at = _check(), now
            return self.last


def _check() -> tuple[dict, int]:
    checks = {}
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; the kind is enough to report
        checks["database"] = f"error: {type(exc).__name__}"
    workers = None
    try:
        redis_client = client(current_app.config["REDIS_URL"])
        redis_client.ping()
        checks["redis"] = "ok"
        workers = health.workers_alive(redis_client)
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    # Workers do not decide the API's readiness (it serves without them); the count is shown.
    return ({"status": "ready" if ready else "unavailable", "checks": checks,
             "workers": workers}, 200 if ready else 503)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI document, built once per process from the route declarations."""
    doc = current_app.extensions.get("txmon_openapi")
    if doc is None:
        doc = current_app.extensions["txmon_openapi"] = openapi_document(current_app)
    return jsonify(doc)
