"""Accounts as the main app registers them. Balances change only through ledger.py."""
from __future__ import annotations

from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from shared.db import db, utcnow
from shared.errors import NotFound
from shared.models import Account


def serialize(a: Account) -> dict:
    """Account as the contract's object."""
    return {"user_id": a.user_id, "email": a.email, "display_name": a.display_name,
            "balance_cents": a.balance_cents, "currency": a.currency, "last_seq": a.last_seq,
            "low_balance_threshold_cents": a.low_balance_threshold_cents,
            "created_at": a.created_at.isoformat(), "updated_at": a.updated_at.isoformat()}


def get(*, user_id: str) -> Account | None:
    """The account, or None."""
    return db.session.get(Account, user_id)


def get_or_raise(*, user_id: str) -> Account:
    """The account, or NotFound."""
    account = get(user_id=user_id)
    if account is None:
        raise NotFound(f"No account for user {user_id}.")
    return account


def upsert(*, user_id: str, **fields) -> tuple[Account, bool]:
    """Create the account or update its profile fields; returns (account, created)."""
    for attempt in (1, 2):
        account = db.session.scalar(select(Account).where(Account.user_id == user_id)
                                    .with_for_update())
        created = account is None
        now = utcnow()
        if created:
            threshold = current_app.config["DEFAULT_LOW_BALANCE_CENTS"]
            account = Account(user_id=user_id, balance_cents=0, currency="USD", last_seq=0,
                              low_balance_threshold_cents=threshold, created_at=now)
            db.session.add(account)
        for name, value in fields.items():
            if value is not None or name != "low_balance_threshold_cents":
                setattr(account, name, value)
        account.updated_at = now
        try:
            db.session.commit()
        except IntegrityError:
            db.session.rollback()  # created concurrently: update the row that won
            if attempt == 2:
                raise
            continue
        return account, created
    raise AssertionError("unreachable")
