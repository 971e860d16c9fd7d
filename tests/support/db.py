"""The test database: its tables, emptied between tests, and plain-SQL access to them."""
from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.exc import OperationalError

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
# Sessions of this database, other than ours, inside a transaction for over 2 s.
_HOLDERS = ("SELECT pid, client_port, state, now() - xact_start AS open_for, left(query, 200)"
            " FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND xact_start < now() - interval '2 seconds'")


def empty_tables(app) -> None:
    """Delete every row of every table (ids restart at 1 on Postgres).

    A session an earlier test left inside a transaction would block the deletes of every
    test after it; instead the first test to meet it fails naming it, and it is terminated.
    """
    from shared.db import db

    with app.app_context():
        try:
            _delete_all(db.engine)
        except OperationalError as exc:
            if db.engine.dialect.name != "postgresql":
                raise
            with db.engine.begin() as conn:
                holders = conn.execute(text(_HOLDERS)).all()
                for h in holders:
                    conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": h.pid})
            _delete_all(db.engine)
            raise AssertionError("an earlier test left these sessions in a transaction, holding"
                                 f" rows (terminated): {[tuple(h) for h in holders]}") from exc


def _delete_all(engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL lock_timeout = '3s'"))
        for table in TABLES:
            conn.execute(text(f"DELETE FROM {table}"))
        if conn.dialect.name == "postgresql":
            conn.execute(text(_RESTART_IDS))
