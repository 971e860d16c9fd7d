"""Admin views: the transaction monitor, alerts, reconciliation (admin JWT)."""
from __future__ import annotations

from flask import Blueprint, jsonify

from api_service import schemas as s
from api_service.contract import operation
from shared import alerts, history, reconcile

bp = Blueprint("admin", __name__, url_prefix="/api/admin")
TAGS = ("admin",)


@bp.get("/transactions/monitor")
@operation("Transaction summary over a time window", auth_as="admin", query=s.MonitorQuery,
           tags=TAGS, responses={200: s.MonitorOut})
def monitor(principal, query):
    return jsonify(history.monitor(minutes=query.minutes))


@bp.get("/alerts")
@operation("Suspicious-activity alerts, newest first", auth_as="admin", query=s.AlertQuery,
           tags=TAGS, responses={200: s.AlertList})
def list_alerts(principal, query):
    rows = alerts.list_alerts(status=query.status, limit=query.limit)
    return jsonify({"alerts": [alerts.serialize(a) for a in rows]})


@bp.post("/alerts/<int(min=1, max=9223372036854775807):alert_id>/acknowledge")
@operation("Acknowledge an alert", auth_as="admin", body=s.AcknowledgeIn, tags=TAGS,
           responses={200: s.AlertOut, 404: s.ErrorOut})
def acknowledge(alert_id, principal, body):
    return jsonify(alerts.serialize(alerts.acknowledge(alert_id=alert_id, note=body.note)))


@bp.get("/reconciliation")
@operation("The last reconciliation run", auth_as="admin", tags=TAGS,
           responses={200: s.ReconciliationOut})
def reconciliation(principal):
    return jsonify(reconcile.last_run())
