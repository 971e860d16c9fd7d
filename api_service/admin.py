"""Admin views: the transaction monitor, alerts, reconciliation (admin JWT)."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from flask import Blueprint, jsonify
from pydantic import BaseModel, StringConstraints

from api_service import schemas as s
from api_service.contract import operation
from shared import alerts, history, reconcile, timeline

bp = Blueprint("admin", __name__, url_prefix="/api/admin")
TAGS = ("admin",)


class SeriesBucket(BaseModel):
    start: str
    transactions: int
    credits_added_cents: int
    credits_spent_cents: int
    refunds_issued_cents: int


class MonitorOut(s.MonitorOut):
    bucket_minutes: int
    series: list[SeriesBucket]


@bp.get("/transactions/monitor")
@operation("Transaction summary over a time window", auth_as="admin", query=s.MonitorQuery,
           tags=TAGS, responses={200: MonitorOut})
def monitor(principal, query):
    return jsonify(history.monitor(minutes=query.minutes))


class TimelineQuery(s.Query):
    limit: s.Limit = 50
    cursor: Optional[Annotated[str, StringConstraints(pattern=timeline.CURSOR_PATTERN)]] = None


class TimelineEvent(BaseModel):
    at: str
    kind: Literal["transaction", "verification", "notification", "alert"]
    id: str
    summary: str
    data: dict


class TimelineOut(BaseModel):
    user_id: str
    events: list[TimelineEvent]
    next_cursor: Optional[str]


@bp.get("/accounts/<user_id>/timeline")
@operation("One account's transactions, verification changes, notifications and alerts, "
           "newest first", auth_as="admin", query=TimelineQuery, ids=("user_id",), tags=TAGS,
           responses={200: TimelineOut, 404: s.ErrorOut})
def account_timeline(user_id, principal, query):
    return jsonify(timeline.page(user_id=user_id, limit=query.limit, cursor=query.cursor))


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


# -- the outbox: follow-up work not yet done, dead letters and their re-drive ----------------

from shared import outbox  # noqa: E402


class OutboxTaskCounts(BaseModel):
    backlog: int
    in_flight: int
    dead: int


class OutboxOut(BaseModel):
    backlog: int
    oldest_due_age_s: float
    in_flight: int
    dead: int
    by_task: dict[str, OutboxTaskCounts]


class OutboxRowOut(BaseModel):
    id: int
    task: str
    user_id: str | None
    payload: dict
    attempts: int
    available_at: str
    created_at: str
    dispatched_at: str | None
    completed_at: str | None
    dead_at: str | None
    last_error: str | None


@bp.get("/outbox")
@operation("Follow-up work not yet done, and dead letters", auth_as="admin", tags=TAGS,
           responses={200: OutboxOut})
def outbox_status(principal):
    return jsonify(outbox.stats())


class DeadQuery(s.Query):
    limit: s.Limit = 50


class DeadOut(BaseModel):
    rows: list[OutboxRowOut]


@bp.get("/outbox/dead")
@operation("Dead letters (rows whose attempts are spent), newest first", auth_as="admin",
           query=DeadQuery, tags=TAGS, responses={200: DeadOut})
def outbox_dead(principal, query):
    return jsonify({"rows": [outbox.serialize(r) for r in outbox.dead_rows(limit=query.limit)]})


@bp.post("/outbox/<int(min=1, max=9223372036854775807):outbox_id>/retry")
@operation("Re-drive a dead outbox row", auth_as="admin", tags=TAGS,
           responses={200: OutboxRowOut, 404: s.ErrorOut, 409: s.ErrorOut})
def outbox_retry(outbox_id, principal):
    return jsonify(outbox.serialize(outbox.retry_dead(outbox_id=outbox_id)))
