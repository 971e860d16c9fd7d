"""The suite's table reset: a session an earlier test left in a transaction fails the next
test once, by name, instead of blocking the reset of every test after it. Postgres only."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from tests.support.db import empty_tables


def test_a_leaked_transaction_fails_one_reset_naming_it_and_the_next_reset_is_clean(
        app, api, database_url):
    if not database_url.startswith("postgres"):
        pytest.skip("sessions and row locks are a Postgres matter")
    api.account("held", 100)
    leaked = create_engine(database_url).connect()
    leaked.execute(text("SELECT * FROM accounts WHERE user_id = 'held' FOR UPDATE"))
    pid = leaked.execute(text("SELECT pg_backend_pid()")).scalar_one()
    try:
        with pytest.raises(AssertionError, match=rf"\({pid}, "):
            empty_tables(app)
        api.account("after", 0)
        empty_tables(app)
        with app.app_context():
            from shared.db import db

            with db.engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM accounts")).scalar_one() == 0
                assert conn.execute(text("SELECT count(*) FROM pg_stat_activity"
                                         " WHERE pid = :p"), {"p": pid}).scalar_one() == 0
    finally:
        leaked.invalidate()
        leaked.engine.dispose()
