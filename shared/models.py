"""Database models. The ledger's invariants live here as constraints where SQL can hold them.

1. accounts.balance_cents == sum(transactions.amount_cents) per account  (ledger.py writes
   both in one transaction; reconcile.py checks it).
2. transactions (user_id, seq) is unique and seq == accounts.last_seq when written, so seq
   runs 1, 2, 3 ... per account (the account row is the lock that orders them).
3. balance_cents >= 0 unless an adjustment made it negative (purchases use a conditional
   UPDATE ... WHERE balance_cents >= cost).
4. (verification_id, type) is unique: one charge and one refund per verification.
5. (reference) is unique per type: a payment_id credits once, an adjustment key applies once.
6. notifications.transaction_id is unique: one in-app notification per transaction.
7. notification_deliveries (notification_id, channel) is the primary key: one delivery per
   channel, written in the notification's commit; its status is the truth of delivery.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, ForeignKey, Index, Integer,
                        String, Text, UniqueConstraint, text)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db import UTCDateTime, db

BigId = BigInteger().with_variant(Integer, "sqlite")

TRANSACTION_TYPES = ("credit", "sms_purchase", "verification_refund", "adjustment")
VERIFICATION_STATUSES = ("pending", "completed", "cancelled", "failed", "timed_out")
NOTIFICATION_TYPES = ("credit_added", "credit_deducted", "instant_refund", "balance_adjusted",
                      "suspicious_activity", "low_balance")
DELIVERY_STATUSES = ("pending", "sent", "skipped", "failed")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class Account(db.Model):
    __tablename__ = "accounts"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    email: Mapped[str | None] = mapped_column(String(254))
    display_name: Mapped[str | None] = mapped_column(String(100))
    balance_cents: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    currency: Mapped[str] = mapped_column(String(3), nullable=False, default="USD")
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    low_balance_threshold_cents: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    __table_args__ = (CheckConstraint("last_seq >= 0", name="last_seq_nonneg"),)


class Transaction(db.Model):
    __tablename__ = "transactions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("accounts.user_id"), nullable=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    amount_cents: Mapped[int] = mapped_column(BigInteger, nullable=False)
    balance_after_cents: Mapped[int] = mapped_column(BigInteger, nullable=False)
    type: Mapped[str] = mapped_column(String(32), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="completed")
    description: Mapped[str | None] = mapped_column(String(300))
    service: Mapped[str | None] = mapped_column(String(64))
    verification_id: Mapped[str | None] = mapped_column(String(64))
    reference: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    __table_args__ = (
        UniqueConstraint("user_id", "seq"),
        CheckConstraint(_in("type", TRANSACTION_TYPES), name="type_known"),
        CheckConstraint("amount_cents <> 0", name="amount_nonzero"),
        CheckConstraint("seq > 0", name="seq_positive"),
        Index("uq_transactions_verification_type", "verification_id", "type", unique=True,
              postgresql_where=text("verification_id IS NOT NULL"),
              sqlite_where=text("verification_id IS NOT NULL")),
        Index("uq_transactions_type_reference", "type", "reference", unique=True,
              postgresql_where=text("reference IS NOT NULL"),
              sqlite_where=text("reference IS NOT NULL")),
        Index("ix_transactions_created_at", "created_at"),
        # The alert rules count one user's transactions in a time window after every debit:
        # a range of this index instead of all the user's rows (or everyone's in the window).
        Index("ix_transactions_user_created", "user_id", "created_at"),
        # History pages filtered by type walk this index from the newest.
        Index("ix_transactions_user_type_seq", "user_id", "type", "seq"),
    )


class AccountTxCount(db.Model):
    """Transactions per (account, type), kept by a database trigger in the inserting commit,
    so history totals need no scan and rows written by plain SQL are counted too."""

    __tablename__ = "account_tx_counts"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(32), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, nullable=False)


class MonitorRollup(db.Model):
    """The admin monitor's roll-up: per (grain, bucket, type) the count and the sum of
    amounts of every transaction with ``id <= monitor_rollup_state.watermark_id`` whose own
    ``created_at`` falls in the bucket (``bucket = epoch seconds // grain_s``; grains 60, 900
    and 3600, the series' widths). Filled by shared/rollups.py in id order, never by a trigger
    on insert."""

    __tablename__ = "monitor_rollups"

    grain_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    type: Mapped[str] = mapped_column(String(32), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, nullable=False)
    amount_cents: Mapped[int] = mapped_column(BigInteger, nullable=False)


class MonitorUserLast(db.Model):
    """Each account's latest ``created_at`` among the rolled-up transactions. Monitor windows
    all end at the open future (``created_at >= cutoff``), so a user is in a window exactly
    when this is at or after its cutoff: unique users are an index range of this table."""

    __tablename__ = "monitor_user_last"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    __table_args__ = (Index("ix_monitor_user_last_last_at", "last_at"),)


class AccountHourCount(db.Model):
    """Per account, type and hour (``hour = epoch seconds // 3600`` of ``created_at``) the
    number of rolled-up transactions (``id <= watermark_id``), filled by the same job: a
    date-filtered history total reads whole hours here and raw rows only for the two cut
    hours and above the watermark (shared/history.py)."""

    __tablename__ = "account_hour_counts"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(32), primary_key=True)
    hour: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, nullable=False)


class MonitorRollupState(db.Model):
    """One row (id 1): every transaction with ``id <= watermark_id`` is in the roll-ups.
    ``pending_id``/``pending_writers`` (PostgreSQL): the next watermark and the transactions
    (virtual ids) that may hold an uncommitted id at or below it (shared/rollups.py)."""

    __tablename__ = "monitor_rollup_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    watermark_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    pending_id: Mapped[int | None] = mapped_column(BigInteger)
    pending_writers: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class MonitorRollupDirty(db.Model):
    """A minute and an account whose roll-ups must be recomputed: written by a trigger on
    UPDATE or DELETE of transactions (never on INSERT, so purchases do not pay for it)."""

    __tablename__ = "monitor_rollup_dirty"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    minute: Mapped[int] = mapped_column(BigInteger, nullable=False)
    user_id: Mapped[str] = mapped_column(String(64), nullable=False)


class Verification(db.Model):
    __tablename__ = "verifications"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("accounts.user_id"), nullable=False,
                                         index=True)
    service_name: Mapped[str] = mapped_column(String(64), nullable=False)
    country: Mapped[str] = mapped_column(String(64), nullable=False)
    cost_cents: Mapped[int] = mapped_column(BigInteger, nullable=False)
    timeout_seconds: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    status_reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    charge_transaction_id: Mapped[int | None] = mapped_column(ForeignKey("transactions.id"))
    refund_transaction_id: Mapped[int | None] = mapped_column(ForeignKey("transactions.id"))

    __table_args__ = (
        CheckConstraint(_in("status", VERIFICATION_STATUSES), name="status_known"),
        CheckConstraint("cost_cents > 0", name="cost_positive"),
        # The timeout scan reads only pending rows past expiry.
        # The account timeline pages on these.
        Index("ix_verifications_user_created", "user_id", "created_at"),
        Index("ix_verifications_user_updated", "user_id", "updated_at"),
        Index("ix_verifications_pending_expiry", "expires_at",
              postgresql_where=text("status = 'pending'"),
              sqlite_where=text("status = 'pending'")),
    )


class Notification(db.Model):
    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64), nullable=False)
    type: Mapped[str] = mapped_column(String(32), nullable=False)
    title: Mapped[str] = mapped_column(String(100), nullable=False)
    message: Mapped[str] = mapped_column(String(500), nullable=False)
    link: Mapped[str | None] = mapped_column(String(200))
    icon: Mapped[str | None] = mapped_column(String(32))
    amount_cents: Mapped[int | None] = mapped_column(BigInteger)
    transaction_id: Mapped[int | None] = mapped_column(ForeignKey("transactions.id"),
                                                       unique=True)
    read: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    deliveries: Mapped[list["NotificationDelivery"]] = relationship(
        lazy="selectin", order_by="NotificationDelivery.channel", viewonly=True)

    __table_args__ = (
        CheckConstraint(_in("type", NOTIFICATION_TYPES), name="type_known"),
        Index("ix_notifications_user_id_id", "user_id", "id"),
        Index("ix_notifications_user_created", "user_id", "created_at"),
        Index("ix_notifications_user_unread", "user_id",
              postgresql_where=text("NOT read"), sqlite_where=text("NOT read")),
    )


class NotificationDelivery(db.Model):
    """A notification on one channel (push, email): the truth of its delivery."""

    __tablename__ = "notification_deliveries"

    notification_id: Mapped[int] = mapped_column(
        ForeignKey("notifications.id", ondelete="CASCADE"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    __table_args__ = (
        CheckConstraint(_in("status", DELIVERY_STATUSES), name="status_known"),
    )


class NotificationPreferences(db.Model):
    __tablename__ = "notification_preferences"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    email_on_credit: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    email_on_debit: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    email_on_refund: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    push_on_credit: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    push_on_debit: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    push_on_refund: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    min_amount_notify_cents: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


# The balance update's task name: shared.outbox declares it; its index names it here.
BALANCE_TASK = "txmon.realtime.publish_balance"


class OutboxMessage(db.Model):
    """Work for the workers, written in the same commit as the data it is about."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[str | None] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(100), nullable=False)
    payload: Mapped[dict] = mapped_column(JSON, nullable=False)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # A runner holds the row until then (it extends the lease while it works).
    leased_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dead_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # attempts spent
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # The lapsed sweep reads rows in flight by dispatch time. No index of unfinished rows
        # by due time: with statistics a minute old the planner scanned it for the runner's
        # statements by id (2.7-3.3 ms a batch, pg_stat_statements) instead of taking the
        # primary key.
        Index("ix_outbox_in_flight", "dispatched_at",
              postgresql_where=text("completed_at IS NULL AND dispatched_at IS NOT NULL"),
              sqlite_where=text("completed_at IS NULL AND dispatched_at IS NOT NULL")),
        # The balance loop's claim, once per commit: waiting balance updates only.
        Index("ix_outbox_balances", "available_at", "id",
              postgresql_where=text(f"dispatched_at IS NULL AND task = '{BALANCE_TASK}'"),
              sqlite_where=text(f"dispatched_at IS NULL AND task = '{BALANCE_TASK}'")),
        # The relay claims rows by due time: a verification's timeout waits here.
        Index("ix_outbox_due", "available_at", "id",
              postgresql_where=text("dispatched_at IS NULL"),
              sqlite_where=text("dispatched_at IS NULL")),
        # The retention job deletes the oldest completed rows.
        Index("ix_outbox_completed", "completed_at",
              postgresql_where=text("completed_at IS NOT NULL"),
              sqlite_where=text("completed_at IS NOT NULL")),
        Index("ix_outbox_dead", "dead_at",
              postgresql_where=text("dead_at IS NOT NULL"),
              sqlite_where=text("dead_at IS NOT NULL")),
    )


class Alert(db.Model):
    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[str | None] = mapped_column(String(64), index=True)
    rule: Mapped[str] = mapped_column(String(64), nullable=False)
    transaction_id: Mapped[int | None] = mapped_column(ForeignKey("transactions.id"))
    details: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="open")
    dedup_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    # "<rule>:<user>" for rules that raise one alert while it is open; unique among open
    # alerts, so two checks racing over one burst cannot both raise one.
    open_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    note: Mapped[str | None] = mapped_column(String(500))

    __table_args__ = (
        CheckConstraint("status IN ('open', 'acknowledged')", name="status_known"),
        Index("ix_alerts_status_id", "status", "id"),
        Index("ix_alerts_user_created", "user_id", "created_at"),
        Index("uq_alerts_open_key", "open_key", unique=True,
              postgresql_where=text("status = 'open'"), sqlite_where=text("status = 'open'")),
    )


class ReconciliationRun(db.Model):
    __tablename__ = "reconciliation_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ran_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    accounts_checked: Mapped[int] = mapped_column(Integer, nullable=False)
    mismatches: Mapped[list] = mapped_column(JSON, nullable=False, default=list)
