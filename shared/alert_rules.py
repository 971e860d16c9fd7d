"""Suspicious-activity rules, checked after each debit (and each adjustment).

A rule is one function decorated with ``@rule``: it gets the committed transaction (a row of
the transactions table: ORM object or Core row, attributes only) and the
app config and returns a ``Finding`` or None. Adding a rule means adding one function here.
Dedup: a finding's ``dedup_key`` is unique in the alerts table, and per-user rules marked
``once_while_open`` are skipped while an earlier alert of theirs is still open, so one
burst raises one alert (a unique index on open alerts' ``open_key`` holds that against
checks racing each other).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

from sqlalchemy import bindparam, func, select

from shared.db import db
from shared.models import Transaction
from shared.money import dollars

_tx = Transaction.__table__
# Built once: a check runs after every debit, and building (and ORM-executing) these per
# call cost the worker more CPU than Postgres spent counting (py-spy, at 100 purchases/s).
_IN_WINDOW = (select(func.count()).select_from(_tx)
              .where(_tx.c.user_id == bindparam("user_id"), _tx.c.created_at > bindparam("since"),
                     _tx.c.created_at <= bindparam("until")))
_REFUNDS_IN_WINDOW = _IN_WINDOW.where(_tx.c.type == "verification_refund")


def _count_in_window(statement, tx, window: int) -> int:
    """How many of the user's transactions (``statement`` narrows which) fall in the
    ``window`` seconds up to ``tx`` (index (user_id, created_at))."""
    return db.session.connection().execute(statement, {
        "user_id": tx.user_id, "since": tx.created_at - timedelta(seconds=window),
        "until": tx.created_at}).scalar_one()


@dataclass
class Finding:
    rule: str
    dedup_key: str
    details: dict = field(default_factory=dict)
    once_while_open: bool = True


RULES: list[Callable] = []


def rule(fn: Callable) -> Callable:
    """Register ``fn(tx, config) -> Finding | None`` as a rule."""
    RULES.append(fn)
    return fn


@rule
def large_deduction(tx, config) -> Finding | None:
    """A single debit larger than TXMON_ALERT_LARGE_DEBIT_CENTS."""
    limit = config["ALERT_LARGE_DEBIT_CENTS"]
    if tx.amount_cents < 0 and -tx.amount_cents > limit:
        return Finding("large_deduction", f"large_deduction:{tx.id}", {
            "amount_cents": tx.amount_cents, "limit_cents": limit,
            "summary": f"{dollars(-tx.amount_cents)} debited at once"}, once_while_open=False)
    return None


@rule
def rapid_transactions(tx, config) -> Finding | None:
    """More than TXMON_ALERT_RAPID_COUNT transactions within TXMON_ALERT_RAPID_WINDOW_S."""
    window = config["ALERT_RAPID_WINDOW_S"]
    count = _count_in_window(_IN_WINDOW, tx, window)
    if count > config["ALERT_RAPID_COUNT"]:
        bucket = int(tx.created_at.timestamp()) // window
        return Finding("rapid_transactions", f"rapid_transactions:{tx.user_id}:{bucket}", {
            "count": count, "window_seconds": window, "limit": config["ALERT_RAPID_COUNT"]})
    return None


@rule
def negative_balance(tx, config) -> Finding | None:
    """The balance went below zero (only an adjustment can do that)."""
    if tx.balance_after_cents < 0:
        return Finding("negative_balance", f"negative_balance:{tx.user_id}:{tx.id}", {
            "balance_after_cents": tx.balance_after_cents})
    return None


@rule
def repeated_refunds(tx, config) -> Finding | None:
    """Many refunds in the rapid window: a failing SMS provider or someone gaming refunds."""
    if tx.type != "verification_refund":
        return None
    window = config["ALERT_RAPID_WINDOW_S"]
    count = _count_in_window(_REFUNDS_IN_WINDOW, tx, window)
    if count > config["ALERT_RAPID_COUNT"]:
        bucket = int(tx.created_at.timestamp()) // window
        return Finding("repeated_refunds", f"repeated_refunds:{tx.user_id}:{bucket}", {
            "refunds": count, "window_seconds": window})
    return None


def evaluate(tx, config) -> list[Finding]:
    """Every rule's finding for ``tx``."""
    return [f for f in (r(tx, config) for r in RULES) if f is not None]
