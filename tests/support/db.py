"""The test database: its tables, emptied between tests, and plain-SQL access to them."""
from __future__ import annotations

from sqlalchemy import text

# Every table, each after the tables whose rows reference it (foreign keys), and the tables
# the transaction triggers fill after the transactions they count.
TABLES = ("notification_deliveries", "notifications", "alerts", "verifications", "outbox",
          "transactions", "accounts", "notification_preferences", "reconciliation_runs",
          "account_tx_counts", "monitor_rollups", "monitor_user_last", "monitor_rollup_state",
          "monitor_rollup_dirty", "account_hour_counts")
# DELETE and a sequence reset, not TRUNCATE: on the few rows a test leaves, TRUNCATE of these
# tables took 58 ms a test (new files for each table) and this 3 ms.
_RESTART_IDS = ("SELECT setval(c.oid, 1, false) FROM pg_class c JOIN pg_namespace n"
                " ON n.oid = c.relnamespace WHERE c.relkind = 'S' AND n.nspname = 'public'")


def empty_tables(app) -> None:
    """Delete every row of every table (ids restart at 1 on Postgres)."""
    from shared.db import db

    with app.app_context(), db.engine.begin() as conn:
        for table in TABLES:
            conn.execute(text(f"DELETE FROM {table}"))
        if conn.dialect.name == "postgresql":
            conn.execute(text(_RESTART_IDS))
