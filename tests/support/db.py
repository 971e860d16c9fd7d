"""The test database: its tables, emptied between tests, and plain-SQL access to them."""
from __future__ import annotations

from sqlalchemy import text

TABLES = ("outbox", "alerts", "notifications", "notification_preferences", "verifications",
          "transactions", "accounts", "reconciliation_runs",
          "account_tx_counts", "monitor_rollups", "monitor_user_last", "monitor_rollup_state",
          "monitor_rollup_dirty", "account_hour_counts")


def empty_tables(app) -> None:
    """Delete every row of every table (ids restart at 1 on Postgres)."""
    from shared.db import db

    with app.app_context(), db.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        else:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))
