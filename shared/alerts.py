"""Suspicious-activity alerts: stored once per dedup key, listed and acknowledged by admins."""
from __future__ import annotations

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from shared import outbox
from shared.db import db, utcnow
from shared.errors import NotFound
from shared.metrics import ALERTS
from shared.models import Alert

alerts_table = Alert.__table__


def serialize(a: Alert) -> dict:
    """Alert as the contract's object."""
    return {"id": a.id, "user_id": a.user_id, "rule": a.rule, "transaction_id": a.transaction_id,
            "details": a.details, "status": a.status, "created_at": a.created_at.isoformat(),
            "acknowledged_at": a.acknowledged_at.isoformat() if a.acknowledged_at else None,
            "note": a.note}


def raise_alert(*, rule: str, user_id: str | None, details: dict, dedup_key: str,
                transaction_id: int | None = None, once_while_open: bool = False,
                _again: bool = True) -> tuple[int, bool]:
    """Store an alert unless one with ``dedup_key`` exists (or, ``once_while_open``, unless
    an alert of ``rule`` for the user is open); returns (alert id, created).

    Both are unique indexes, so racing callers store one alert between them. The admin
    email and the admin-feed message are outbox rows of the same commit.
    """
    open_key = f"{rule}:{user_id}" if once_while_open else None
    row = {"rule": rule, "user_id": user_id, "details": details, "dedup_key": dedup_key,
           "open_key": open_key, "transaction_id": transaction_id, "status": "open",
           "created_at": utcnow()}
    try:
        with db.engine.begin() as conn:
            alert_id = conn.execute(insert(alerts_table).returning(alerts_table.c.id),
                                    row).scalar_one()
            outbox.write(conn, [
                outbox.message(outbox.EMAIL_ALERT, user_id, row["created_at"], alert_id=alert_id),
                outbox.message(outbox.PUBLISH_ALERT, user_id, row["created_at"],
                               alert_id=alert_id)])
    except IntegrityError:
        a = alerts_table.c
        with db.engine.connect() as conn:
            existing = conn.execute(select(a.id).where(a.dedup_key == dedup_key)).scalar()
            if existing is None and open_key is not None:
                existing = conn.execute(select(a.id).where(
                    a.open_key == open_key, a.status == "open")).scalar()
        if existing is None:
            if not _again:
                raise
            # The open alert it clashed with was acknowledged meanwhile: try once more.
            return raise_alert(rule=rule, user_id=user_id, details=details,
                               dedup_key=dedup_key, transaction_id=transaction_id,
                               once_while_open=once_while_open, _again=False)
        return existing, False
    ALERTS.labels(rule=rule).inc()
    return alert_id, True


def list_alerts(*, status: str | None, limit: int) -> list[Alert]:
    """Alerts newest first, optionally only open or acknowledged ones."""
    q = select(Alert)
    if status:
        q = q.where(Alert.status == status)
    return db.session.scalars(q.order_by(Alert.id.desc()).limit(limit)).all()


def acknowledge(*, alert_id: int, note: str | None) -> Alert:
    """Acknowledge an alert (again: keeps the first acknowledgement time, updates the note)."""
    alert = db.session.get(Alert, alert_id, with_for_update=True)
    if alert is None:
        raise NotFound(f"No alert {alert_id}.")
    if alert.status != "acknowledged":
        alert.status = "acknowledged"
        alert.acknowledged_at = utcnow()
    if note is not None:
        alert.note = note
    db.session.commit()
    return alert


def open_keys(keys: set[str], *, conn) -> set[str]:
    """Which of the once-while-open ``keys`` ("<rule>:<user>") have an open alert, in one
    query on ``conn``."""
    a = alerts_table.c
    return set(conn.execute(select(a.open_key).where(a.status == "open",
                                                     a.open_key.in_(sorted(keys)))).scalars())
