"""The ledger: the one place where money moves.

Every movement is one database transaction that
  1. updates the account row (balance and last_seq) - the row lock orders all of an
     account's movements, so seq is gapless and balance_after is exact;
  2. writes the transaction row (signed amount, balance_after_cents, seq);
  3. writes the owner's in-app notification (and a low_balance one when a debit crosses the
     account's threshold);
  4. writes the outbox rows for what the workers do next.
Nothing else in txmon changes a balance. See models.py for the invariants the database holds.

This module decides what a movement writes; shared/ledger_sql.py holds the statements that
write it. Round trips while the account row is locked: one, every INSERT and the COMMIT
sent as one message after the UPDATE ... RETURNING (which also draws the new rows' ids).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from shared import ledger_sql, notifications, outbox, realtime
from shared.db import RawSql, db, utcnow
from shared.errors import IdempotencyMismatch, InsufficientFunds, InvalidState, NotFound
from shared.metrics import REFUND_LATENCY, TRANSACTIONS
from shared.models import Account, Transaction, Verification

log = logging.getLogger("txmon.ledger")

accounts = Account.__table__
transactions = Transaction.__table__
verifications = Verification.__table__

REFUND_STATUSES = {"cancelled": "cancelled", "failed": "failed", "timed_out": "timed out"}


@dataclass
class Movement:
    """The outcome of a ledger call. ``created`` is False for an idempotent replay."""

    transaction: dict
    balance_cents: int
    created: bool
    verification: dict | None = None


class _Row:
    """Attribute access over a dict, so serializers take rows and plain values alike."""

    def __init__(self, values: dict):
        self.__dict__.update(values)


def serialize_transaction(row) -> dict:
    """A transaction row (ORM object or Core row) as the contract's object."""
    return {"id": row.id, "seq": row.seq, "user_id": row.user_id,
            "amount_cents": row.amount_cents, "type": row.type, "status": row.status,
            "description": row.description, "service": row.service,
            "verification_id": row.verification_id, "reference": row.reference,
            "balance_after_cents": row.balance_after_cents,
            "created_at": row.created_at.isoformat()}


def serialize_verification(row) -> dict:
    """A verification row (ORM object or Core row) as the contract's object."""
    return {"id": row.id, "user_id": row.user_id, "service_name": row.service_name,
            "country": row.country, "cost_cents": row.cost_cents, "status": row.status,
            "created_at": row.created_at.isoformat(), "expires_at": row.expires_at.isoformat(),
            "charge_transaction_id": row.charge_transaction_id,
            "refund_transaction_id": row.refund_transaction_id}


def _post(sql: RawSql, *, user_id: str, amount_cents: int, tx: dict, notification,
          now: datetime, require_funds: bool = False, extra_outbox=(), then=None,
          moved: tuple | None = None) -> dict:
    """Move ``amount_cents`` on the account inside ``sql``'s transaction (RawSql.transaction).

    The UPDATE ... RETURNING locks the account row and hands back the balance, the seq and
    the new rows' ids; the transaction, its notification, the outbox rows and
    ``then(sql, tx)`` (the caller's own statements) read nothing back, so on Postgres they
    leave in one round trip with the COMMIT: the row lock is held for that round trip, not
    one per statement. Returns the transaction. Raises NotFound / InsufficientFunds with
    nothing written (the transaction rolls back); a unique violation surfaces as
    IntegrityError when the transaction ends. ``moved``: the UPDATE's row, when the caller
    moved the balance itself (a refund claims its verification in the same statement).
    """
    row = moved or ledger_sql.move_balance(sql, user_id=user_id, amount_cents=amount_cents,
                                           now=now, require_funds=require_funds)
    if row is None:
        found = ledger_sql.balance_of(sql, user_id)
        if found is None:
            raise NotFound(f"No account for user {user_id}.")
        raise InsufficientFunds("The balance does not cover this purchase.",
                                {"balance_cents": found, "required_cents": -amount_cents})
    balance, seq, threshold, tx_id, note_id = row
    values = dict(tx, id=tx_id, user_id=user_id, seq=seq, amount_cents=amount_cents,
                  status="completed", balance_after_cents=balance, created_at=now)
    data = serialize_transaction(_Row(values))
    ledger_sql.insert_transaction(sql, values)
    ledger_sql.insert_notification(sql, user_id=user_id, content=notification(balance), now=now,
                                   transaction_id=tx_id, notification_id=note_id)
    notes = [note_id]
    if amount_cents < 0 and balance - amount_cents >= threshold > balance:
        # Rare: this id is read back, which sends what is queued so far.
        notes.append(ledger_sql.insert_notification(
            sql, user_id=user_id, now=now,
            content=notifications.for_low_balance(balance, threshold)))
    ledger_sql.insert_deliveries(sql, notes, now)
    rows = [m for nid in notes for m in outbox.notification_messages(nid, user_id, now)]
    # The balance_update travels in the row, so the relay publishes it without a task hop.
    rows.append(outbox.message(outbox.PUBLISH_BALANCE, user_id, now, transaction_id=tx_id,
                               message=realtime.balance_update(data, now.isoformat())))
    rows.append(outbox.message(outbox.CHECK_ALERTS, user_id, now, transaction_id=tx_id))
    rows.extend(extra_outbox)
    outbox.write(sql, rows)
    if then is not None:
        then(sql, values)
    return data


def _committed(movement: Movement, *, notification_type: str) -> Movement:
    """After-commit effects of a new movement: log lines and metrics."""
    tx = movement.transaction
    old = tx["balance_after_cents"] - tx["amount_cents"]
    log.info("Transaction created: Type=%s, Amount=%s", tx["type"], tx["amount_cents"])
    log.info("Balance: User=%s, %s → %s", tx["user_id"], old, tx["balance_after_cents"])
    log.info("Notification sent: Type=%s, User=%s", notification_type, tx["user_id"])
    TRANSACTIONS.labels(type=tx["type"], status=tx["status"]).inc()
    return movement


def _engine():
    return db.engine


# -- credits -------------------------------------------------------------------------------

def record_credit(*, user_id: str, amount_cents: int, payment_id: str,
                  description: str | None = None) -> Movement:
    """Credit a payment to the account once; a replay of the same payment returns it again."""
    now = utcnow()
    tx = {"type": "credit", "reference": payment_id,
          "description": description or "Credit top-up", "service": None,
          "verification_id": None}
    try:
        with RawSql.transaction(_engine()) as sql:
            values = _post(sql, user_id=user_id, amount_cents=amount_cents, tx=tx, now=now,
                           notification=lambda bal: notifications.for_credit(amount_cents, bal))
    except IntegrityError:
        existing = _by_reference("credit", payment_id)
        if existing is None:
            raise
        if (existing.user_id, existing.amount_cents) != (user_id, amount_cents):
            raise IdempotencyMismatch(
                "payment_id was already used with a different user or amount.",
                {"payment_id": payment_id}) from None
        return Movement(serialize_transaction(existing), existing.balance_after_cents, False)
    return _committed(Movement(values, values["balance_after_cents"], True),
                      notification_type="credit_added")


def apply_adjustment(*, user_id: str, amount_cents: int, reason: str,
                     idempotency_key: str) -> Movement:
    """Apply a signed correction (e.g. a chargeback); it alone may make a balance negative."""
    now = utcnow()
    tx = {"type": "adjustment", "reference": idempotency_key, "description": reason,
          "service": None, "verification_id": None}
    try:
        with RawSql.transaction(_engine()) as sql:
            values = _post(sql, user_id=user_id, amount_cents=amount_cents, tx=tx, now=now,
                           notification=lambda bal: notifications.for_adjustment(
                               amount_cents, bal, reason))
    except IntegrityError:
        existing = _by_reference("adjustment", idempotency_key)
        if existing is None:
            raise
        if (existing.user_id, existing.amount_cents, existing.description) != (
                user_id, amount_cents, reason):
            raise IdempotencyMismatch(
                "idempotency_key was already used with different parameters.",
                {"idempotency_key": idempotency_key}) from None
        return Movement(serialize_transaction(existing), existing.balance_after_cents, False)
    return _committed(Movement(values, values["balance_after_cents"], True),
                      notification_type="balance_adjusted")


def _by_reference(tx_type: str, reference: str):
    with _engine().connect() as conn:
        return conn.execute(select(transactions).where(
            transactions.c.type == tx_type, transactions.c.reference == reference)).first()


# -- verifications -------------------------------------------------------------------------

def charge_verification(*, verification_id: str, user_id: str, service_name: str, country: str,
                        cost_cents: int, timeout_seconds: int) -> Movement:
    """Charge a verification purchase once; never below zero (InsufficientFunds instead)."""
    now = utcnow()
    expires_at = now + timedelta(seconds=timeout_seconds)
    tx = {"type": "sms_purchase", "reference": None, "service": service_name,
          "verification_id": verification_id,
          "description": f"{service_name} verification ({country})"}
    ver = {"id": verification_id, "user_id": user_id, "service_name": service_name,
           "country": country, "cost_cents": cost_cents, "timeout_seconds": timeout_seconds,
           "status": "pending", "created_at": now, "expires_at": expires_at, "updated_at": now,
           "refund_transaction_id": None}

    def insert_verification(sql, charge: dict) -> None:
        ver["charge_transaction_id"] = charge["id"]
        ledger_sql.insert_verification(sql, ver)

    expire = outbox.message(outbox.EXPIRE_VERIFICATION, user_id, now, available_at=expires_at,
                            verification_id=verification_id)
    try:
        with RawSql.transaction(_engine()) as sql:
            values = _post(sql, user_id=user_id, amount_cents=-cost_cents, tx=tx, now=now,
                           require_funds=True, extra_outbox=[expire], then=insert_verification,
                           notification=lambda bal: notifications.for_purchase(
                               cost_cents, bal, service_name, verification_id))
    except (IntegrityError, InsufficientFunds, NotFound) as exc:
        replay = _purchase_replay(verification_id, user_id=user_id, service_name=service_name,
                                  country=country, cost_cents=cost_cents,
                                  timeout_seconds=timeout_seconds)
        if replay is None:
            raise exc from None
        return replay
    log.info("Credits deducted: User=%s, Amount=%s, Service=%s", user_id, cost_cents,
             service_name)
    movement = Movement(values, values["balance_after_cents"], True,
                        verification=serialize_verification(_Row(ver)))
    return _committed(movement, notification_type="credit_deducted")


def _purchase_replay(verification_id: str, **fields) -> Movement | None:
    """The first answer for an already-charged verification id, or None if there is none."""
    with _engine().connect() as conn:
        ver = conn.execute(select(verifications)
                           .where(verifications.c.id == verification_id)).first()
        if ver is None:
            return None
        if any(getattr(ver, k) != v for k, v in fields.items()):
            raise IdempotencyMismatch(
                "This verification id was already used with different fields.",
                {"id": verification_id})
        charge = conn.execute(select(transactions).where(
            transactions.c.id == ver.charge_transaction_id)).first()
    return Movement(serialize_transaction(charge), charge.balance_after_cents, False,
                    verification=serialize_verification(ver))


def get_verification(*, verification_id: str) -> dict:
    """The verification as the contract's object, or NotFound."""
    with _engine().connect() as conn:
        ver = conn.execute(select(verifications)
                           .where(verifications.c.id == verification_id)).first()
    if ver is None:
        raise NotFound(f"No verification {verification_id}.")
    return serialize_verification(ver)


def complete_verification(*, verification_id: str) -> dict:
    """Mark a pending verification completed (its charge stands). Completed again: no-op."""
    now = utcnow()
    with RawSql.transaction(_engine()) as sql:
        ledger_sql.complete_verification(sql, verification_id=verification_id, now=now)
    ver = get_verification(verification_id=verification_id)
    if ver["status"] != "completed":
        raise InvalidState(f"A {ver['status']} verification cannot be completed.",
                           {"status": ver["status"]})
    return ver


def refund_verification(*, verification_id: str, status: str, reason: str | None = None,
                        ver=None) -> Movement:
    """End a pending verification as cancelled/failed/timed_out and refund its charge once;
    timed_out only once ``expires_at`` has come (NotYetExpired before).

    Asking again for the same ending returns the same refund; any other ending is
    InvalidState. The verification is claimed (pending -> its ending) before the account
    is touched, in one statement on Postgres: of racing endings only the winner goes on to
    lock the account, and no other path locks an existing verification and then an
    account, so the two orders cannot deadlock (a purchase locks the account, then INSERTs
    its new verification). ``ver``: the verification row, when the caller loaded it.
    """
    if status not in REFUND_STATUSES:
        raise ValueError(f"not a refunding status: {status}")
    now = utcnow()
    if ver is None:
        with _engine().connect() as conn:
            ver = conn.execute(select(verifications)
                               .where(verifications.c.id == verification_id)).first()
    if ver is None:
        raise NotFound(f"No verification {verification_id}.")
    why = reason or REFUND_STATUSES[status]
    tx = {"type": "verification_refund", "reference": None, "service": ver.service_name,
          "verification_id": verification_id,
          "description": f"Refund: {ver.service_name} verification ({why})"}

    def link_refund(sql, refund: dict) -> None:
        ledger_sql.link_refund(sql, verification_id=verification_id, refund_id=refund["id"])

    if ver.status == "pending":
        if status == "timed_out" and ver.expires_at > now:
            raise NotYetExpired(ver.expires_at)
        try:
            with RawSql.transaction(_engine()) as sql:
                moved = ledger_sql.claim_and_refund(
                    sql, verification_id=verification_id, status=status, reason=reason,
                    now=now, only_if_expired=status == "timed_out")
                if moved is None:
                    raise _LostRace()
                values = _post(sql, user_id=ver.user_id, amount_cents=ver.cost_cents, tx=tx,
                               now=now, then=link_refund, moved=moved,
                               notification=lambda bal: notifications.for_refund(
                                   ver.cost_cents, bal, ver.service_name, why))
        except (_LostRace, IntegrityError):
            pass
        else:
            ended = dict(ver._mapping, status=status, refund_transaction_id=values["id"])
            movement = Movement(values, values["balance_after_cents"], True,
                                verification=serialize_verification(_Row(ended)))
            latency_from = ver.expires_at if status == "timed_out" else now
            _observe_refund_latency(latency_from)
            if status == "timed_out":
                log.info("Auto-refund processed: Verification=%s, Amount=%s", verification_id,
                         ver.cost_cents)
            return _committed(movement, notification_type="instant_refund")
    return _refund_replay(verification_id, status)


class NotYetExpired(Exception):
    """A timeout for a verification still pending before its expires_at: nothing refunded."""

    def __init__(self, expires_at: datetime):
        super().__init__(f"expires at {expires_at.isoformat()}")
        self.expires_at = expires_at


class _LostRace(Exception):
    """Another request ended the verification first; roll back and report what it did."""


def _refund_replay(verification_id: str, status: str) -> Movement:
    with _engine().connect() as conn:
        ver = conn.execute(select(verifications)
                           .where(verifications.c.id == verification_id)).first()
        refund = None
        if ver.refund_transaction_id is not None:
            refund = conn.execute(select(transactions).where(
                transactions.c.id == ver.refund_transaction_id)).first()
    if ver.status != status or refund is None:
        raise InvalidState(f"The verification is already {ver.status}.", {"status": ver.status})
    return Movement(serialize_transaction(refund), refund.balance_after_cents, False,
                    verification=serialize_verification(ver))


def _observe_refund_latency(since: datetime) -> None:
    REFUND_LATENCY.observe(max(0.0, (utcnow() - since).total_seconds()))
