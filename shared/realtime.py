"""Realtime publish helpers: per-user and admin channels on Redis pub/sub.

Workers publish after commit; each API process holds one subscription (pattern
``txmon:rt:*``) and fans messages out to its sockets (issue: websocket relay).
"""
from __future__ import annotations

import json

from flask import current_app

from shared.redis_client import client

USER_CHANNEL = "txmon:rt:user:{user_id}"
ADMIN_CHANNEL = "txmon:rt:admin"


def user_channel(user_id: str) -> str:
    """The pub/sub channel for one user's messages."""
    return USER_CHANNEL.format(user_id=user_id)


def publish(channel: str, message: dict) -> int:
    """Publish ``message`` as JSON; returns how many subscribers got it."""
    return client(current_app.config["REDIS_URL"]).publish(channel, json.dumps(message))


def balance_update(tx: dict, timestamp: str) -> dict:
    """The websocket ``balance_update`` message for a committed transaction."""
    return {"type": "balance_update", "balance_cents": tx["balance_after_cents"],
            "seq": tx["seq"], "transaction": tx, "timestamp": timestamp}
