"""Channels: how a notification reaches its user outside the app (push, email).

A channel answers "is this notification wanted on me" (the user's preferences) and "send
these" (a batch, in one connection). ``deliver`` runs one channel over a batch of
notifications: one query loads them with their delivery on that channel, accounts,
preferences and transactions, the channel sends what is wanted, one statement records every
outcome in notification_deliveries. No row lock is held while sending: the outbox lease
keeps a second runner away, and a delivery is recorded once (it moves from pending only).

A new channel (webhook, SMS) is one class here plus its handler in worker_service.
"""
from __future__ import annotations

import json
import logging

from sqlalchemy import and_, bindparam, select, update

from shared import mail, notifications, outbox, realtime
from shared.db import db, utcnow
from shared.metrics import EMAILS, NOTIFICATIONS
from shared.models import (Account, Notification, NotificationDelivery, NotificationPreferences,
                           Transaction)
from shared.money import dollars

log = logging.getLogger("txmon.delivery")

_n, _a = Notification.__table__, Account.__table__
_p, _t = NotificationPreferences.__table__, Transaction.__table__
_d = NotificationDelivery.__table__
_BATCH = (
    select(*_n.c, _d.c.status.label("delivery_status"), _a.c.email.label("account_email"),
           _a.c.balance_cents.label("account_balance_cents"),
           _a.c.user_id.label("account_user_id"),
           _p.c.user_id.label("prefs_user_id"),
           *[_p.c[f].label(f"pref_{f}") for f in notifications.PREFERENCE_FIELDS],
           _t.c.balance_after_cents.label("tx_balance_after_cents"))
    .select_from(_n.join(_d, and_(_d.c.notification_id == _n.c.id,
                                  _d.c.channel == bindparam("channel")))
                 .outerjoin(_a, _a.c.user_id == _n.c.user_id)
                 .outerjoin(_p, _p.c.user_id == _n.c.user_id)
                 .outerjoin(_t, _t.c.id == _n.c.transaction_id))
    .where(_n.c.id.in_(bindparam("ids", expanding=True))))
_DELIVERIES = (select(_d).where(_d.c.notification_id.in_(bindparam("ids", expanding=True)))
               .order_by(_d.c.notification_id, _d.c.channel))
# One statement per batch (executemany: one round trip with psycopg's pipeline).
_RECORD = (update(_d)
           .where(_d.c.notification_id == bindparam("nid"), _d.c.channel == bindparam("ch"),
                  _d.c.status == "pending")
           .values(status=bindparam("new_status"), attempts=_d.c.attempts + bindparam("tried"),
                   last_error=bindparam("error"), updated_at=bindparam("now")))


def preferences_of(row) -> dict:
    """The preferences loaded with a ``_BATCH`` row (defaults where never set)."""
    if row.prefs_user_id is None:
        return dict(notifications.DEFAULT_PREFERENCES)
    return {f: row._mapping[f"pref_{f}"] for f in notifications.PREFERENCE_FIELDS}


def wanted(channel: str, n, prefs: dict) -> bool:
    """Whether the user wants ``n`` on ``channel`` ("push" or "email")."""
    kind = notifications.PREFERENCE_KIND.get(n.type)
    if kind is not None and not prefs[f"{channel}_on_{kind}"]:
        return False
    if n.amount_cents is not None and n.type != "low_balance":
        return abs(n.amount_cents) >= prefs["min_amount_notify_cents"]
    return True


class Push:
    """The user's realtime channel (Redis pub/sub, read by the API's websockets)."""

    name, task = "push", outbox.PUSH

    def wanted(self, row) -> bool:
        return wanted("push", row, preferences_of(row))

    def send(self, rows: list) -> dict[int, Exception | None]:
        """Publish every notification in one Redis pipeline (all or nothing)."""
        from flask import current_app

        from shared.redis_client import client

        with db.engine.connect() as conn:
            found = conn.execute(_DELIVERIES, {"ids": [row.id for row in rows]}).all()
        deliveries: dict[int, list] = {}
        for d in found:
            deliveries.setdefault(d.notification_id, []).append(d)
        pipe = client(current_app.config["REDIS_URL"]).pipeline(transaction=False)
        for row in rows:
            pipe.publish(realtime.user_channel(row.user_id), json.dumps(
                {"type": "notification",
                 "notification": notifications.serialize(row, deliveries.get(row.id, []))}))
        pipe.execute()
        return {row.id: None for row in rows}


class Breaker:
    """A channel whose server is in trouble (a timeout, a refused connection) is paused for
    every worker, through a Redis key: while paused, one runner at a time tries it and the
    others postpone their rows untried, so a stuck server holds one pool process at most,
    never all of them (pushes and alert checks keep running)."""

    PAUSE_S = 30
    RETRY_S = 5  # a postponed row is due again this much later

    def __init__(self, name: str):
        self.key, self.probe = f"txmon:channel:{name}:paused", f"txmon:channel:{name}:probe"

    def _redis(self):
        from flask import current_app

        from shared.redis_client import client

        return client(current_app.config["REDIS_URL"])

    def allow(self) -> tuple[bool, bool]:
        """(may this runner send now, is the channel paused)."""
        try:
            r = self._redis()
            if not r.exists(self.key):
                return True, False
            return bool(r.set(self.probe, 1, nx=True, ex=self.PAUSE_S)), True
        except Exception:  # Redis away: nothing to coordinate with, try the channel
            return True, False

    def trip(self) -> None:
        try:
            self._redis().set(self.key, 1, ex=self.PAUSE_S)
        except Exception:
            pass

    def reset(self) -> None:
        try:
            self._redis().delete(self.key, self.probe)
        except Exception:
            pass

    def guard(self, rows: list, send) -> dict:
        """``send(rows)`` if the channel is not paused (or this runner probes it), else every
        row postponed; ``send`` returns per row None or an exception, a connection-level one
        (not in mail.REFUSED) trips the breaker."""
        allowed, paused = self.allow()
        if not allowed:
            return {row.id: outbox.Postpone(self.RETRY_S) for row in rows}
        results = send(rows)
        errors = [e for e in results.values() if isinstance(e, Exception)]
        if any(not isinstance(e, mail.REFUSED) for e in errors):
            self.trip()
        elif paused:
            self.reset()
        return results


SMTP_BREAKER = Breaker("email")


class Email:
    """Email over SMTP_URL: one connection for the batch, a stable Message-ID per
    notification (so the rare duplicate, a worker dying between the server's acceptance
    and the commit, is recognisable)."""

    name, task = "email", outbox.SEND_EMAIL

    def wanted(self, row) -> bool:
        return (row.account_user_id is not None and bool(row.account_email)
                and wanted("email", row, preferences_of(row)))

    def send(self, rows: list) -> dict[int, Exception | None]:
        """Send each email; a connection-level failure fails the rest of the batch at once
        (the server is in trouble: no second timeout per message) and pauses the channel."""
        return SMTP_BREAKER.guard(rows, self._send)

    def _send(self, rows: list) -> dict[int, Exception | None]:
        results: dict[int, Exception | None] = {}
        trouble: Exception | None = None
        for row in rows:
            if trouble is not None:
                results[row.id] = trouble
                continue
            try:
                mail.send(mail.build(to=row.account_email, subject=f"txmon: {row.title}",
                                     context=_context(row), message_id=message_id(row.id)))
                results[row.id] = None
            except mail.REFUSED as exc:  # this recipient only
                results[row.id] = exc
            except Exception as exc:
                results[row.id] = trouble = exc
        return results


CHANNELS = {c.name: c for c in (Push(), Email())}


def message_id(notification_id: int) -> str:
    """The Message-ID every email of one notification carries."""
    return f"<notification-{notification_id}@txmon.local>"


def deliver(channel_name: str, notification_ids: list[int]) -> dict[int, object]:
    """Deliver ``notification_ids`` on one channel; returns, per id, "sent", "skipped",
    "refused" (final for this message), "gone" (the notification no longer exists), "done"
    (delivered before), an outbox.Postpone, or the exception its send raised (the caller's
    retry schedule decides)."""
    channel = CHANNELS[channel_name]
    with db.engine.connect() as conn:
        rows = conn.execute(_BATCH, {"ids": list(notification_ids), "channel": channel_name}
                            ).all()
    outcome: dict[int, object] = {i: "gone" for i in notification_ids}
    todo, skipped = [], []
    for row in rows:
        if row.delivery_status != "pending":
            outcome[row.id] = "done"
        elif channel.wanted(row):
            todo.append(row)
        else:
            skipped.append(row)
    results = channel.send(todo) if todo else {}
    for row in skipped:
        outcome[row.id] = "skipped"
    for row in todo:
        result = results.get(row.id)
        # Refused by the server for this message alone: retrying cannot help, it is final.
        outcome[row.id] = ("refused" if isinstance(result, mail.REFUSED)
                           else "sent" if result is None else result)
    record(channel_name, {row.id: outcome[row.id] for row in todo + skipped})
    _count(channel_name, [r for r in todo if outcome[r.id] == "sent"], skipped,
           [r for r in todo if outcome[r.id] == "refused"])
    return outcome


_STATUS = {"sent": "sent", "skipped": "skipped", "refused": "failed"}


def record(channel: str, outcomes: dict[int, object]) -> None:
    """Record the outcome of each notification's delivery on ``channel``, in one statement:
    final ones set the status, a failed try counts an attempt and keeps its error."""
    now = utcnow()
    params = []
    for nid, result in outcomes.items():
        if isinstance(result, outbox.Postpone):
            continue  # not tried
        status = _STATUS.get(result, "pending") if isinstance(result, str) else "pending"
        params.append({"nid": nid, "ch": channel, "new_status": status, "now": now,
                       "tried": 0 if result == "skipped" else 1,
                       "error": None if status in ("sent", "skipped") else _error(result)})
    if params:
        with db.engine.begin() as conn:
            conn.execute(_RECORD, params)


def _error(result) -> str:
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"[:2000]
    return "SMTPRecipientsRefused" if result == "refused" else str(result)[:2000]


def _count(channel: str, sent: list, skipped: list, failed: list) -> None:
    for row in sent:
        NOTIFICATIONS.labels(type=row.type, success="true").inc()
    if channel != "email":
        return
    for row in sent:
        log.info("Email sent: Type=%s, User=%s", row.type, row.user_id)
    if sent:
        EMAILS.labels(result="sent").inc(len(sent))
    if skipped:
        EMAILS.labels(result="skipped").inc(len(skipped))
    if failed:
        EMAILS.labels(result="failed").inc(len(failed))


def mark_failed(channel: str, *, notification_ids: list[int]) -> None:
    """Record that delivery on ``channel`` gave up (attempts spent), in one statement."""
    if not notification_ids:
        return
    with db.engine.begin() as conn:
        conn.execute(update(_d).where(_d.c.notification_id.in_(list(notification_ids)),
                                      _d.c.channel == channel, _d.c.status == "pending")
                     .values(status="failed", updated_at=utcnow()))
    if channel == "email":
        EMAILS.labels(result="failed").inc(len(notification_ids))


def _context(row) -> dict:
    """The email's template context; "Amount" and "New balance" as of the notification."""
    if row.type == "low_balance":  # amount_cents holds the balance that triggered it
        amounts = {"amount": None, "balance": dollars(row.amount_cents)}
    else:
        balance = row.account_balance_cents
        if row.transaction_id is not None and row.tx_balance_after_cents is not None:
            balance = row.tx_balance_after_cents
        amounts = {"amount": dollars(abs(row.amount_cents or 0)), "balance": dollars(balance)}
    return {"title": row.title, "message": row.message, "wallet_url": _wallet_url(), **amounts}


def _wallet_url() -> str:
    from flask import current_app

    return current_app.config["TXMON_PUBLIC_URL"].rstrip("/") + "/wallet"
