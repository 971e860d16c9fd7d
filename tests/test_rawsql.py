"""shared.db.RawSql.transaction: the ledger's driver-level transactions (both databases).

On Postgres the statements are queued and sent as one message (BEGIN and COMMIT among
them, bound on the client) when a result is read and at the end, the connection in
autocommit meanwhile; whatever happens inside, the connection must go back to the pool
idle and in SQLAlchemy's usual (non-autocommit) mode, and a failed block must leave
nothing behind.
"""
from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from shared import ledger
from shared.db import RawSql, db
from shared.errors import IdempotencyMismatch, InsufficientFunds, NotFound

pytestmark = pytest.mark.smoke


def _count(sql_text: str, **params) -> int:
    with db.engine.connect() as conn:
        return conn.execute(text(sql_text), params).scalar_one()


def _assert_pool_clean() -> None:
    """Every connection the pool holds is idle and not in autocommit."""
    pool = db.engine.pool
    assert pool.checkedin() > 0, "the pool holds no connection: there is nothing to check"
    held = [db.engine.raw_connection() for _ in range(pool.checkedin())]
    try:
        for pooled in held:
            conn = pooled.dbapi_connection
            if db.engine.dialect.name == "postgresql":
                assert conn.autocommit is False
                assert conn.info.transaction_status == 0  # IDLE
            else:
                assert not conn.in_transaction
    finally:
        for pooled in held:
            pooled.close()


def test_block_that_raises__rolls_back_everything(app, api):
    api.account("raw-a", 500)
    with app.app_context(), pytest.raises(RuntimeError):
        with RawSql.transaction(db.engine) as sql:
            sql.execute("UPDATE accounts SET balance_cents = 0 WHERE user_id = %s", ("raw-a",))
            assert sql.execute("SELECT balance_cents FROM accounts WHERE user_id = %s",
                               ("raw-a",)).fetchone()[0] == 0
            raise RuntimeError("the caller gives up")
    with app.app_context():
        assert _count("SELECT balance_cents FROM accounts WHERE user_id = 'raw-a'") == 500
        _assert_pool_clean()


def test_unique_violation__integrity_error_and_nothing_written(app, api):
    api.account("raw-b", 500)
    with app.app_context(), pytest.raises(IntegrityError):
        with RawSql.transaction(db.engine) as sql:
            sql.execute("UPDATE accounts SET balance_cents = 1 WHERE user_id = %s", ("raw-b",))
            sql.execute("INSERT INTO accounts (user_id, balance_cents, currency, last_seq,"
                        " low_balance_threshold_cents, created_at, updated_at)"
                        " SELECT user_id, 0, currency, 0, 0, created_at, updated_at"
                        " FROM accounts WHERE user_id = %s", ("raw-b",))
    with app.app_context():
        assert _count("SELECT balance_cents FROM accounts WHERE user_id = 'raw-b'") == 500
        _assert_pool_clean()


def test_ledger_failures_leave_the_pool_clean(app, api):
    """Replays (unique violations at COMMIT), refusals and mismatches, many times over."""
    api.account("raw-c", 1_000)
    with app.app_context():
        _ledger_failures()


def _ledger_failures() -> None:
    first = ledger.charge_verification(verification_id="raw-v", user_id="raw-c",
                                       service_name="X", country="US", cost_cents=400,
                                       timeout_seconds=60)
    for _ in range(12):
        replay = ledger.charge_verification(verification_id="raw-v", user_id="raw-c",
                                            service_name="X", country="US", cost_cents=400,
                                            timeout_seconds=60)
        assert not replay.created and replay.transaction == first.transaction
        with pytest.raises(IdempotencyMismatch):
            ledger.charge_verification(verification_id="raw-v", user_id="raw-c",
                                       service_name="X", country="US", cost_cents=401,
                                       timeout_seconds=60)
        with pytest.raises(InsufficientFunds):
            ledger.charge_verification(verification_id="raw-big", user_id="raw-c",
                                       service_name="X", country="US", cost_cents=5_000,
                                       timeout_seconds=60)
        with pytest.raises(NotFound):
            ledger.record_credit(user_id="raw-nobody", amount_cents=5, payment_id="raw-p")
    assert _count("SELECT balance_cents FROM accounts WHERE user_id = 'raw-c'") == 600
    assert _count("SELECT count(*) FROM transactions WHERE user_id = 'raw-c'") == 2
    _assert_pool_clean()
    # and the pooled connections still work for the next movement
    ledger.record_credit(user_id="raw-c", amount_cents=5, payment_id="raw-p2")
    assert _count("SELECT balance_cents FROM accounts WHERE user_id = 'raw-c'") == 605


def test_failed_pipelines_then_success__prepared_statements_stay_in_step(app, api):
    """A statement psycopg decides to prepare in the part of a pipeline that an error
    aborted was never prepared on the server; the next use of it on that connection must
    not fail with "prepared statement ... does not exist" (found by the fuzz run)."""
    from sqlalchemy import create_engine

    with app.app_context():
        url = db.engine.url
    if url.get_backend_name() != "postgresql":
        pytest.skip("pipelines and prepared statements are Postgres-only")
    api.account("raw-prep", 100)
    engine = create_engine(url, pool_size=1, max_overflow=0)  # one connection
    bump = "UPDATE accounts SET last_seq = last_seq WHERE user_id = %s RETURNING balance_cents"
    clash = ("INSERT INTO accounts (user_id, balance_cents, currency, last_seq,"
             " low_balance_threshold_cents, created_at, updated_at)"
             " VALUES (%s, 0, 'USD', 0, 0, now(), now())")
    after = "SELECT count(*) FROM accounts WHERE user_id = %s"
    try:
        for attempt in range(12):  # past psycopg's prepare threshold for every statement
            with pytest.raises(IntegrityError):
                with RawSql.transaction(engine) as sql:
                    assert sql.execute(bump, ("raw-prep",)).fetchone()[0] == 100
                    sql.execute(clash, ("raw-prep",))  # duplicate key: aborts the rest
                    sql.execute(after, ("raw-prep",))
            with RawSql.transaction(engine) as sql:
                assert sql.execute(bump, ("raw-prep",)).fetchone()[0] == 100
                assert sql.execute(after, ("raw-prep",)).fetchone()[0] == 1, attempt
    finally:
        engine.dispose()


def _postgres(app) -> bool:
    with app.app_context():
        return db.engine.dialect.name == "postgresql"


def test_purchase__two_round_trips_on_postgres(app, api, monkeypatch):
    """BEGIN with the UPDATE, then every INSERT with the COMMIT, each group one pipeline (one
    round trip) of prepared statements: what ARCHITECTURE.md says."""
    if not _postgres(app):
        pytest.skip("SQLite runs statement by statement")
    from contextlib import contextmanager

    import psycopg

    blocks: list[list[tuple[str, bool]]] = []
    real_execute, real_pipeline = psycopg.Cursor.execute, psycopg.Connection.pipeline

    def recording(self, query, params=None, **kw):
        if blocks:
            blocks[-1].append((str(query), kw.get("prepare") is True))
        return real_execute(self, query, params, **kw)

    @contextmanager
    def marking(self):
        blocks.append([])
        with real_pipeline(self) as pipeline:
            yield pipeline
        blocks.append([])  # a statement after the block is not in it

    api.account("raw-msg", 500)
    monkeypatch.setattr(psycopg.Cursor, "execute", recording)
    monkeypatch.setattr(psycopg.Connection, "pipeline", marking)
    with app.app_context():
        ledger.charge_verification(verification_id="raw-msg-v", user_id="raw-msg",
                                   service_name="WhatsApp", country="US", cost_cents=100,
                                   timeout_seconds=60)
    sent = [b for b in blocks if b]
    assert len(sent) == 2, sent
    first, second = ([q for q, _ in b] for b in sent)
    assert first[0] == "BEGIN" and first[1].startswith("UPDATE accounts") and len(first) == 2
    assert second[0].startswith("INSERT INTO transactions") and second[-1] == "COMMIT"
    assert all(prepared for b in sent for _, prepared in b), sent
    with app.app_context():
        assert _count("SELECT balance_cents FROM accounts WHERE user_id = 'raw-msg'") == 400


@pytest.mark.parametrize("awkward", [
    "O'Brien", "back\\slash", "100% sure", "%s and %(x)s", "quote'); DROP TABLE accounts; --",
    "dollar $$ quoted $1", "unicode: ☃ 名前 ✓", "new\nline\ttab"])
def test_values_bound_on_the_client_come_back_exactly(app, api, awkward):
    """Bound values: any text is stored as given, never read as SQL."""
    api.account("raw-q", 500)
    with app.app_context():
        ledger.charge_verification(verification_id="raw-q-v", user_id="raw-q",
                                   service_name=awkward, country="US", cost_cents=1,
                                   timeout_seconds=60)
        assert _count("SELECT count(*) FROM transactions WHERE service = :s", s=awkward) == 1
        with db.engine.connect() as conn:
            stored = conn.execute(text("SELECT service_name FROM verifications "
                                       "WHERE id = 'raw-q-v'")).scalar_one()
        assert stored == awkward
        assert _count("SELECT count(*) FROM accounts") == 1
        _assert_pool_clean()


def test_reading_back_an_earlier_queued_statement_is_refused(app, api):
    if not _postgres(app):
        pytest.skip("SQLite runs statement by statement")
    api.account("raw-r", 500)
    with app.app_context(), pytest.raises(RuntimeError, match="last statement queued"):
        with RawSql.transaction(db.engine) as sql:
            first = sql.execute("SELECT balance_cents FROM accounts WHERE user_id = %s",
                                ("raw-r",))
            sql.execute("UPDATE accounts SET balance_cents = 0 WHERE user_id = %s", ("raw-r",))
            first.fetchone()
    with app.app_context():
        assert _count("SELECT balance_cents FROM accounts WHERE user_id = 'raw-r'") == 500
        _assert_pool_clean()
