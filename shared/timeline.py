"""One account's story for operators: transactions, verification state changes,
notifications and alerts, newest first, keyset paged.

Order: (at, kind rank, id) descending; the rank breaks ties between kinds at one instant
(the ledger stamps a transaction and its notification with the same time). Each source is
read through its (user_id, time) index for at most ``limit + 1`` rows after the cursor, so a
page costs the same whatever the history's size.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, or_, select, tuple_

from shared import alerts, notifications
from shared.db import db
from shared.errors import NotFound
from shared.ledger import serialize_transaction, serialize_verification
from shared.models import Account, Alert, Notification, Transaction, Verification

# rank: ties at one instant list the later kind of a movement first (newest first).
RANKS = {"transaction": 0, "verification_created": 1, "verification_ended": 2,
         "notification": 3, "alert": 4}


def _sources():
    """(rank key, model, time column, id column, event builder) for each source."""
    def tx(r):
        return "transaction", str(r.id), f"{r.type} {r.amount_cents:+d} cents (seq {r.seq})", \
            serialize_transaction(r)

    def ver_created(r):
        return "verification", f"{r.id}:pending", \
            f"verification {r.id} pending ({r.service_name}, {r.country})", \
            serialize_verification(r)

    def ver_ended(r):
        return "verification", f"{r.id}:{r.status}", f"verification {r.id} {r.status}", \
            serialize_verification(r)

    def note(r):
        data = notifications.serialize(r)
        return "notification", str(r.id), f"{r.title} (email {data['email_status']})", data

    def alert(r):
        return "alert", str(r.id), f"alert {r.rule} ({r.status})", alerts.serialize(r)

    return (("transaction", Transaction, Transaction.created_at, Transaction.id, tx, None),
            ("verification_created", Verification, Verification.created_at, Verification.id,
             ver_created, None),
            ("verification_ended", Verification, Verification.updated_at, Verification.id,
             ver_ended, Verification.status != "pending"),
            ("notification", Notification, Notification.created_at, Notification.id, note, None),
            ("alert", Alert, Alert.created_at, Alert.id, alert, None))


# The cursor: "<UTC epoch microseconds>~<rank>~<id>"; ranks 1 and 2 carry a verification id.
CURSOR_PATTERN = r"^[0-9]{1,16}~(?:[034]~[0-9]{1,18}|[12]~[A-Za-z0-9_.:-]{1,64})$"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def encode_cursor(at: datetime, rank: int, key) -> str:
    micros = (at - EPOCH) // timedelta(microseconds=1)
    return f"{micros}~{rank}~{key}"


def decode_cursor(cursor: str) -> tuple[datetime, int, object]:
    """A cursor the route's pattern admitted, back to (at, rank, id)."""
    micros, rank, key = cursor.split("~", 2)
    rank = int(rank)
    return (EPOCH + timedelta(microseconds=int(micros)), rank,
            key if rank in (1, 2) else int(key))


def page(*, user_id: str, limit: int = 50, cursor: str | None = None) -> dict:
    """``{user_id, events, next_cursor}`` newest first; 404 for an unknown account."""
    if db.session.get(Account, user_id) is None:
        raise NotFound("No such account.", {"user_id": user_id})
    after = decode_cursor(cursor) if cursor else None
    candidates = []
    for name, model, at_col, id_col, build, extra in _sources():
        rank = RANKS[name]
        q = select(model).where(model.user_id == user_id)
        if extra is not None:
            q = q.where(extra)
        if after is not None:
            c_at, c_rank, c_key = after
            if rank < c_rank:
                q = q.where(at_col <= c_at)
            elif rank > c_rank:
                q = q.where(at_col < c_at)
            else:
                q = q.where(or_(at_col < c_at, and_(at_col == c_at, id_col < c_key)))
        for row in db.session.scalars(q.order_by(at_col.desc(), id_col.desc()).limit(limit + 1)):
            at = getattr(row, at_col.key)
            candidates.append(((at, rank, row.id), build(row)))
    candidates.sort(key=lambda c: c[0], reverse=True)
    chosen = candidates[:limit]
    events = [{"at": key[0].isoformat().replace("+00:00", "Z"), "kind": kind, "id": event_id,
               "summary": summary, "data": data}
              for key, (kind, event_id, summary, data) in chosen]
    more = len(candidates) > limit
    return {"user_id": user_id, "events": events,
            "next_cursor": encode_cursor(*chosen[-1][0]) if more else None}
