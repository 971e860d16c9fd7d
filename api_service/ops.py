"""Operations: liveness, readiness and the OpenAPI document."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from api_service import schemas as s
from api_service.contract import openapi_document, operation
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
    checks = {}
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; the kind is enough to report
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        client(current_app.config["REDIS_URL"]).ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ready" if ready else "unavailable", "checks": checks}), (
        200 if ready else 503)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI document, built once per process from the route declarations."""
    doc = current_app.extensions.get("txmon_openapi")
    if doc is None:
        doc = current_app.extensions["txmon_openapi"] = openapi_document(current_app)
    return jsonify(doc)
