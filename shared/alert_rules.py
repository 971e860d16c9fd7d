"""Suspicious-activity rules, checked after each debit (and each adjustment).

A rule is one function decorated with ``@rule``: it gets a batch of committed transactions
(rows of the transactions table: ORM objects or Core rows, attributes only) and the app
config and returns a ``Finding`` per transaction that breaks it, with at most one query for
the whole batch. Adding a rule means adding one function here.
Dedup: a finding's ``dedup_key`` is unique in the alerts table, and per-user rules marked
``once_while_open`` are skipped while an earlier alert of theirs is still open, so one
burst raises one alert (a unique index on open alerts' ``open_key`` holds that against
checks racing each other).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

from sqlalchemy import bindparam, select

from shared.db import db
from shared.models import Transaction
from shared.money import dollars

_tx = Transaction.__table__
# Built once: a check runs after every debit (index (user_id, created_at)).
_IN_WINDOW = (select(_tx.c.user_id, _tx.c.created_at)
              .where(_tx.c.user_id.in_(bindparam("users", expanding=True)),
                     _tx.c.created_at > bindparam("since"),
                     _tx.c.created_at <= bindparam("until")))
_REFUNDS_IN_WINDOW = _IN_WINDOW.where(_tx.c.type == "verification_refund")


def _counts_in_window(statement, txs: list, window: int) -> dict[int, int]:
    """Per transaction, how many of its user's transactions (``statement`` narrows which)
    fall in the ``window`` seconds up to it: one query for the whole batch."""
    if not txs:
        return {}
    span = timedelta(seconds=window)
    found = db.session.connection().execute(statement, {
        "users": sorted({t.user_id for t in txs}),
        "since": min(t.created_at for t in txs) - span,
        "until": max(t.created_at for t in txs)}).all()
    by_user: dict[str, list] = {}
    for user_id, created_at in found:
        by_user.setdefault(user_id, []).append(created_at)
    return {t.id: sum(t.created_at - span < at <= t.created_at
                      for at in by_user.get(t.user_id, ())) for t in txs}


@dataclass
class Finding:
    rule: str
    dedup_key: str
    details: dict = field(default_factory=dict)
    once_while_open: bool = True


RULES: list[Callable] = []


def rule(fn: Callable) -> Callable:
    """Register ``fn(txs, config) -> {transaction id: Finding}`` as a rule."""
    RULES.append(fn)
    return fn


@rule
def large_deduction(txs, config) -> dict:
    """A single debit larger than TXMON_ALERT_LARGE_DEBIT_CENTS."""
    limit = config["ALERT_LARGE_DEBIT_CENTS"]
    return {tx.id: Finding("large_deduction", f"large_deduction:{tx.id}", {
        "amount_cents": tx.amount_cents, "limit_cents": limit,
        "summary": f"{dollars(-tx.amount_cents)} debited at once"}, once_while_open=False)
        for tx in txs if tx.amount_cents < 0 and -tx.amount_cents > limit}


@rule
def rapid_transactions(txs, config) -> dict:
    """More than TXMON_ALERT_RAPID_COUNT transactions within TXMON_ALERT_RAPID_WINDOW_S."""
    window, limit = config["ALERT_RAPID_WINDOW_S"], config["ALERT_RAPID_COUNT"]
    counts = _counts_in_window(_IN_WINDOW, txs, window)
    return {tx.id: Finding(
        "rapid_transactions",
        f"rapid_transactions:{tx.user_id}:{int(tx.created_at.timestamp()) // window}",
        {"count": counts[tx.id], "window_seconds": window, "limit": limit})
        for tx in txs if counts[tx.id] > limit}


@rule
def negative_balance(txs, config) -> dict:
    """The balance went below zero (only an adjustment can do that)."""
    return {tx.id: Finding("negative_balance", f"negative_balance:{tx.user_id}:{tx.id}", {
        "balance_after_cents": tx.balance_after_cents})
        for tx in txs if tx.balance_after_cents < 0}


@rule
def repeated_refunds(txs, config) -> dict:
    """Many refunds in the rapid window: a failing SMS provider or someone gaming refunds."""
    refunds = [tx for tx in txs if tx.type == "verification_refund"]
    window, limit = config["ALERT_RAPID_WINDOW_S"], config["ALERT_RAPID_COUNT"]
    counts = _counts_in_window(_REFUNDS_IN_WINDOW, refunds, window)
    return {tx.id: Finding(
        "repeated_refunds",
        f"repeated_refunds:{tx.user_id}:{int(tx.created_at.timestamp()) // window}",
        {"refunds": counts[tx.id], "window_seconds": window})
        for tx in refunds if counts[tx.id] > limit}


def evaluate(txs: list, config) -> dict[int, list[Finding]]:
    """Every rule's findings, per transaction of ``txs`` (one query per rule at most)."""
    found: dict[int, list[Finding]] = {tx.id: [] for tx in txs}
    for r in RULES:
        for tx_id, finding in r(txs, config).items():
            found[tx_id].append(finding)
    return found
