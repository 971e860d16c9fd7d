"""The statements that write the ledger's movements (shared/ledger.py decides what to write).

Fixed SQL text on the driver's cursor (shared.db.RawSql): the purchase is the hot path, and
building Core statements per call cost more CPU than Postgres spent running them. Inside
RawSql.transaction on Postgres, statements whose result is not read are queued and leave
with the next read or the COMMIT, so only ``move_balance`` (and a rare read) costs a round
trip. Outbox rows are written by shared/outbox.py, which owns that table.
"""
from __future__ import annotations

from datetime import datetime

from shared import outbox
from shared.db import RawSql

_UPDATE = ("UPDATE accounts SET balance_cents = balance_cents + %s, last_seq = last_seq + 1,"
           " updated_at = %s WHERE user_id = %s{funds}"
           " RETURNING balance_cents, last_seq, low_balance_threshold_cents, {ids}")
# The new transaction's and notification's ids come back with the UPDATE, so every INSERT
# can go out in one batch with the COMMIT. SQLite serializes writers (BEGIN IMMEDIATE), so
# the next id there is simply max + 1.
_NEW_IDS = {"postgresql": "nextval('transactions_id_seq') AS tx_id,"
                          " nextval('notifications_id_seq') AS note_id",
            "sqlite": "(SELECT COALESCE(MAX(id), 0) + 1 FROM transactions) AS tx_id,"
                      " (SELECT COALESCE(MAX(id), 0) + 1 FROM notifications) AS note_id"}
_UPDATES = {(dialect, funded): _UPDATE.format(
    ids=ids, funds=" AND balance_cents >= %s" if funded else "")
    for dialect, ids in _NEW_IDS.items() for funded in (False, True)}
_BALANCE = "SELECT balance_cents FROM accounts WHERE user_id = %s"
_INSERT_TX = ("INSERT INTO transactions (id, user_id, seq, amount_cents, balance_after_cents, type,"
              " status, description, service, verification_id, reference, created_at)"
              " VALUES (%s, %s, %s, %s, %s, %s, 'completed', %s, %s, %s, %s, %s)")
_NOTE_COLUMNS = "user_id, type, title, message, link, icon, amount_cents, transaction_id, read, created_at"
_NOTE_VALUES = "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s"
_INSERT_NOTE = f"INSERT INTO notifications (id, {_NOTE_COLUMNS}) VALUES (%s, {_NOTE_VALUES})"
_INSERT_NOTE_NEW_ID = (f"INSERT INTO notifications ({_NOTE_COLUMNS}) VALUES ({_NOTE_VALUES})"
                       " RETURNING id")
_INSERT_DELIVERIES = ("INSERT INTO notification_deliveries"
                      " (notification_id, channel, status, attempts, updated_at) VALUES ")
_CLAIM = ("UPDATE verifications SET status = %s, status_reason = %s, updated_at = %s"
          " WHERE id = %s AND status = 'pending'{due} RETURNING id")  # {due}: the expiry check
_CLAIMS = {True: _CLAIM.format(due=" AND expires_at <= %s"), False: _CLAIM.format(due="")}
_INSERT_VERIFICATION = (
    "INSERT INTO verifications (id, user_id, service_name, country, cost_cents, timeout_seconds,"
    " status, created_at, expires_at, updated_at, charge_transaction_id)"
    " VALUES (%s, %s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s)")
_LINK_REFUND = "UPDATE verifications SET refund_transaction_id = %s WHERE id = %s"
_COMPLETE_VERIFICATION = ("UPDATE verifications SET status = 'completed', updated_at = %s"
                          " WHERE id = %s AND status = 'pending'")


def move_balance(sql: RawSql, *, user_id: str, amount_cents: int, now: datetime,
                 require_funds: bool) -> tuple | None:
    """Add ``amount_cents`` to the account (locking its row; with ``require_funds`` only if
    the balance covers it) and bump its seq. Returns (balance, seq, low-balance threshold,
    new transaction id, new notification id), or None when no row changed."""
    params = (amount_cents, now, user_id) + ((-amount_cents,) if require_funds else ())
    return sql.execute(_UPDATES[sql.dialect, require_funds], params).fetchone()


def balance_of(sql: RawSql, user_id: str) -> int | None:
    """The account's balance, None if there is no account."""
    row = sql.execute(_BALANCE, (user_id,)).fetchone()
    return None if row is None else row[0]


def insert_transaction(sql: RawSql, t: dict) -> None:
    """Write a completed transaction row (``t`` holds every column)."""
    sql.execute(_INSERT_TX, (t["id"], t["user_id"], t["seq"], t["amount_cents"],
                             t["balance_after_cents"], t["type"], t["description"],
                             t["service"], t["verification_id"], t["reference"],
                             t["created_at"]))


def insert_notification(sql: RawSql, *, user_id: str, content: dict, now: datetime,
                        transaction_id: int | None = None,
                        notification_id: int | None = None) -> int:
    """Write one in-app notification; returns its id. With ``notification_id`` (drawn from
    the sequence beforehand) nothing is read back, so the INSERT is queued with the others."""
    values = (user_id, content["type"], content["title"], content["message"], content["link"],
              content["icon"], content["amount_cents"], transaction_id, False, now)
    if notification_id is not None:
        sql.execute(_INSERT_NOTE, (notification_id,) + values)
        return notification_id
    return sql.execute(_INSERT_NOTE_NEW_ID, values).fetchone()[0]


def insert_deliveries(sql: RawSql, notification_ids: list[int], now: datetime) -> None:
    """One pending delivery per channel for each notification, in one INSERT."""
    params = []
    for nid in notification_ids:
        for channel in outbox.CHANNELS:
            params += (nid, channel, now)
    rows = ", ".join(["(%s, %s, 'pending', 0, %s)"] * (len(params) // 3))
    sql.execute(_INSERT_DELIVERIES + rows, params)


def claim_verification(sql: RawSql, *, verification_id: str, status: str, reason: str | None,
                       now: datetime, only_if_expired: bool) -> bool:
    """End a pending verification (``only_if_expired``: only once ``expires_at`` has come);
    False if it was not pending (or not yet expired)."""
    params = (status, reason, now, verification_id) + ((now,) if only_if_expired else ())
    return sql.execute(_CLAIMS[only_if_expired], params).fetchone() is not None


_CLAIM_AND_REFUND = (
    "WITH claimed AS (" + _CLAIM.replace(" RETURNING id", " RETURNING user_id, cost_cents") + ")"
    " UPDATE accounts SET balance_cents = balance_cents + claimed.cost_cents,"
    " last_seq = last_seq + 1, updated_at = %s FROM claimed"
    " WHERE accounts.user_id = claimed.user_id"
    " RETURNING balance_cents, last_seq, low_balance_threshold_cents, " + _NEW_IDS["postgresql"])
_CLAIMS_AND_REFUNDS = {due: _CLAIM_AND_REFUND.format(due=" AND expires_at <= %s" if due else "")
                       for due in (True, False)}


def claim_and_refund(sql: RawSql, *, verification_id: str, status: str, reason: str | None,
                     now: datetime, only_if_expired: bool) -> tuple | None:
    """End a pending verification and give its cost back to the account: on Postgres one
    statement (the verification row locked first, then the account). Returns
    ``move_balance``'s row, or None when the verification was not pending (or not expired)."""
    if sql.sqlite:
        if not claim_verification(sql, verification_id=verification_id, status=status,
                                  reason=reason, now=now, only_if_expired=only_if_expired):
            return None
        user_id, cost = sql.execute("SELECT user_id, cost_cents FROM verifications WHERE id = %s",
                                    (verification_id,)).fetchone()
        return move_balance(sql, user_id=user_id, amount_cents=cost, now=now,
                            require_funds=False)
    params = (status, reason, now, verification_id) + ((now,) if only_if_expired else ()) + (now,)
    return sql.execute(_CLAIMS_AND_REFUNDS[only_if_expired], params).fetchone()


def insert_verification(sql: RawSql, v: dict) -> None:
    """Write a new pending verification (``v`` holds every column)."""
    sql.execute(_INSERT_VERIFICATION, (
        v["id"], v["user_id"], v["service_name"], v["country"], v["cost_cents"],
        v["timeout_seconds"], v["created_at"], v["expires_at"], v["updated_at"],
        v["charge_transaction_id"]))


def link_refund(sql: RawSql, *, verification_id: str, refund_id: int) -> None:
    """Record the refund transaction of an ended verification."""
    sql.execute(_LINK_REFUND, (refund_id, verification_id))


def complete_verification(sql: RawSql, *, verification_id: str, now: datetime) -> None:
    """Mark a pending verification completed (a no-op for any other status)."""
    sql.execute(_COMPLETE_VERIFICATION, (now, verification_id))
