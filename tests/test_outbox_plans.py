"""The outbox's statements keep using their indexes when the outbox outgrows its statistics.

The outbox is a queue: it was empty when last analyzed (a fresh database, or autovacuum
not yet round), and holds tens of thousands of rows a minute later. A prepared statement
whose generic plan was costed while the table was small keeps that plan - a sequential
scan of the whole table - however large the table grows; every transaction on the outbox
plans each run instead (shared/outbox.py ``PLAN_EVERY_RUN``), while other statements on the
same connections keep their cached plans. The statement prepared here is the relay's
balance claim, an outbox claim like the others. Postgres only.
"""
from __future__ import annotations

import re

import pytest
from sqlalchemy import text

from shared.db import db


def _claim_plan(conn) -> str:
    rows = conn.exec_driver_sql(
        "EXPLAIN EXECUTE txmon_claim(now(), now(), now(), 'txmon.realtime.publish_balance', 500)").all()
    return "\n".join(r[0] for r in rows)


def _prepare_claim_while_small(conn) -> None:
    from shared.outbox import CLAIM_BALANCES as _CLAIM_BALANCES

    numbered = iter(range(1, 6))
    statement = re.sub("%s", lambda _m: f"${next(numbered)}", _CLAIM_BALANCES)
    # Empty as in a fresh database: no pages left by earlier tests' deleted rows, and no
    # column statistics (ANALYZE of an empty table keeps those an earlier one gathered).
    conn.exec_driver_sql("TRUNCATE outbox")
    conn.exec_driver_sql("DELETE FROM pg_statistic WHERE starelid = 'outbox'::regclass")
    conn.exec_driver_sql("ANALYZE outbox")  # the statistics say so
    conn.exec_driver_sql(
        f"PREPARE txmon_claim(timestamptz, timestamptz, timestamptz, text, int) AS {statement}")
    for _ in range(8):  # past the point where Postgres settles on a generic plan
        _claim_plan(conn)


def _grow_outbox(conn) -> None:
    """30,000 dispatched rows and a few waiting balance updates, not analyzed."""
    conn.execute(text(
        "INSERT INTO outbox (user_id, task, payload, available_at, created_at,"
        " dispatched_at, completed_at, attempts)"
        " SELECT 'u' || g, 'txmon.notifications.deliver_all', '{}', now(), now(),"
        " now(), now(), 1 FROM generate_series(1, 30000) g"))
    conn.execute(text(
        "INSERT INTO outbox (user_id, task, payload, available_at, created_at, attempts)"
        " SELECT 'u' || g, 'txmon.realtime.publish_balance', '{}', now(), now(), 0"
        " FROM generate_series(1, 3) g"))


def test_outbox_claims_use_their_index_after_the_outbox_grew(app, database_url):
    if not database_url.startswith("postgres"):
        pytest.skip("plan caching is a Postgres matter")
    from shared import outbox
    from worker_service.celery_app import create_worker_app

    worker_app = create_worker_app({"SQLALCHEMY_DATABASE_URI": database_url})
    with worker_app.app_context():
        try:
            with outbox._begin() as conn:  # every outbox statement runs in one of these
                assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar_one() \
                    == "force_custom_plan"
            with db.engine.connect() as conn:
                # Outside them the default: the cached plan costed for the empty table stays.
                assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar_one() == "auto"
                _prepare_claim_while_small(conn)
                _grow_outbox(conn)
                assert "Seq Scan on outbox" in _claim_plan(conn)
                conn.exec_driver_sql(outbox.PLAN_EVERY_RUN)
                plan = _claim_plan(conn)
                assert "ix_outbox_balances" in plan, plan
                assert "Seq Scan on outbox" not in plan, plan
                conn.exec_driver_sql("DEALLOCATE txmon_claim")
                conn.rollback()
        finally:
            db.engine.dispose()


def _explained(conn, statement, params) -> list:
    """The plan of ``statement`` as the application sends it (SQLAlchemy's own SQL and
    parameters, EXPLAIN in front): it is planned, not run."""
    from sqlalchemy import event

    def explain(_conn, _cursor, sql, parameters, _context, _many):
        return "EXPLAIN " + sql, parameters

    event.listen(conn, "before_cursor_execute", explain, retval=True)
    try:
        return conn.execute(statement, params).all()
    finally:
        event.remove(conn, "before_cursor_execute", explain)


def test_runner_statements_by_id_take_the_primary_key_after_the_outbox_grew(app, database_url):
    """With statistics from an empty outbox, the runner's lease, its completion and the
    relay's dispatch mark, each for a batch of ids, read those rows by primary key: not the
    whole table, and not an index of due times (a scan of every unfinished row); the relay's
    claim reads due rows in order up to its limit."""
    if not database_url.startswith("postgres"):
        pytest.skip("plans are a Postgres matter")
    from datetime import timedelta

    from shared import outbox
    from shared.db import utcnow
    from worker_service.celery_app import create_worker_app

    worker_app = create_worker_app({"SQLALCHEMY_DATABASE_URI": database_url})
    with worker_app.app_context():
        try:
            with db.engine.connect() as conn:
                conn.exec_driver_sql("TRUNCATE outbox")
                conn.exec_driver_sql("DELETE FROM pg_statistic WHERE starelid = 'outbox'::regclass")
                conn.exec_driver_sql("ANALYZE outbox")
                _grow_outbox(conn)
                # Waiting rows too, as the queue holds under load: every one of them due.
                conn.execute(text(
                    "INSERT INTO outbox (user_id, task, payload, available_at, created_at, attempts)"
                    " SELECT 'u' || g, 'txmon.notifications.push', '{}', now(), now(), 0"
                    " FROM generate_series(1, 5000) g"))
                conn.commit()
            ids = list(range(30001, 30101))
            now = utcnow()
            statements = {
                "start": (outbox._START, {"ids": ids, "now": now,
                                          "until": now + timedelta(seconds=30)}),
                "complete": (outbox._COMPLETE, {"ids": ids, "now": now}),
                "dispatch": (outbox._MARK_DISPATCHED, {"ids": ids, "now": now}),
            }
            for name, (statement, params) in statements.items():
                with outbox._begin() as conn:
                    plan = "\n".join(r[0] for r in _explained(conn, statement, params))
                    conn.rollback()
                assert "pk_outbox" in plan, (name, plan)
                assert "Seq Scan" not in plan and "ix_outbox" not in plan, (name, plan)
            # The relay's claim of the 5,000 rows due at one instant: read in index order and
            # stopped at the limit, not all read and sorted.
            claim = outbox._claim("postgresql", 500, False, (), (outbox.PUBLISH_BALANCE,))
            with outbox._begin() as conn:
                plan = "\n".join(r[0] for r in _explained(
                    conn, claim, {"now": now + timedelta(seconds=1), "stale": now}))
                conn.rollback()
            assert "Index Scan using ix_outbox_due" in plan, plan
            assert "Sort" not in plan and "Bitmap" not in plan, plan
        finally:
            with db.engine.begin() as conn:
                conn.exec_driver_sql("TRUNCATE outbox")
            db.engine.dispose()


def test_operator_outbox_view_reads_no_completed_row(app, database_url):
    """GET /api/admin/outbox (outbox.stats) counts waiting, in-flight and dead rows on their
    indexes: the completed rows, nearly all of a long-lived outbox, are never scanned."""
    if not database_url.startswith("postgres"):
        pytest.skip("plans are a Postgres matter")
    from sqlalchemy import event

    from shared import outbox
    from worker_service.celery_app import create_worker_app

    worker_app = create_worker_app({"SQLALCHEMY_DATABASE_URI": database_url})
    plans: list[str] = []

    def explain_too(_conn, cursor, sql, parameters, _context, _many):
        if sql.lstrip().upper().startswith("SELECT") and "FROM outbox" in sql:
            cursor.execute("EXPLAIN " + sql, parameters)
            plans.append("\n".join(r[0] for r in cursor.fetchall()))

    with worker_app.app_context():
        try:
            with db.engine.begin() as conn:
                _grow_outbox(conn)
            event.listen(db.engine, "before_cursor_execute", explain_too)
            try:
                body = outbox.stats()
            finally:
                event.remove(db.engine, "before_cursor_execute", explain_too)
            assert body["backlog"] == 3 and body["in_flight"] == 0 and body["dead"] == 0
            assert len(plans) == 3, plans
            for plan in plans:
                assert "Seq Scan" not in plan and "ix_outbox_" in plan, plan
        finally:
            with db.engine.begin() as conn:
                conn.exec_driver_sql("TRUNCATE outbox")
            db.engine.dispose()


def test_retention_reads_completed_rows_by_completion_time(app, database_url):
    """The hourly purge finds what to delete on ix_outbox_completed and stops at its limit:
    with nothing old enough it reads nothing, however many rows completed recently."""
    if not database_url.startswith("postgres"):
        pytest.skip("plans are a Postgres matter")
    from datetime import timedelta

    from sqlalchemy import event

    from shared import outbox
    from shared.db import utcnow
    from worker_service.celery_app import create_worker_app

    worker_app = create_worker_app({"SQLALCHEMY_DATABASE_URI": database_url})
    plans: list[str] = []

    def explain_too(_conn, cursor, sql, parameters, _context, _many):
        if sql.lstrip().upper().startswith("DELETE FROM OUTBOX"):
            cursor.execute("EXPLAIN " + sql, parameters)
            plans.append("\n".join(r[0] for r in cursor.fetchall()))

    with worker_app.app_context():
        try:
            with db.engine.begin() as conn:
                _grow_outbox(conn)  # 30,000 rows completed just now
            event.listen(db.engine, "before_cursor_execute", explain_too)
            try:
                assert outbox.purge_completed(utcnow() - timedelta(days=7)) == 0
            finally:
                event.remove(db.engine, "before_cursor_execute", explain_too)
            assert len(plans) == 1, plans
            assert "ix_outbox_completed" in plans[0] and "Seq Scan" not in plans[0], plans[0]
        finally:
            with db.engine.begin() as conn:
                conn.exec_driver_sql("TRUNCATE outbox")
            db.engine.dispose()
