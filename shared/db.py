"""The SQLAlchemy handle both services bind to their Flask app, and dialect tweaks."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import DateTime, MetaData, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


db = SQLAlchemy(model_class=Base)


def utcnow() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite drops tz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)  # whatever the session's TimeZone is


@event.listens_for(Engine, "connect")
def _sqlite_connect(dbapi_conn, _record):
    """SQLite: let SQLAlchemy drive transactions, enable WAL and foreign keys."""
    if type(dbapi_conn).__module__.startswith("sqlite3"):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()


@event.listens_for(Engine, "begin")
def _sqlite_begin(conn):
    """SQLite: take the write lock at BEGIN so concurrent writers serialize, not deadlock."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class RawSql:
    """Fixed SQL on a DBAPI connection: the ledger's hot path.

    The ledger's statements never change shape, so building them as SQLAlchemy Core on every
    call cost more CPU than the database spent running them. Here they are plain text run on
    the driver's cursor (prepared statements inside ``transaction``). The text is written
    with ``%s`` placeholders; on SQLite they become ``?`` and aware datetimes become the
    naive-UTC text UTCDateTime stores, so both databases read the same rows back. A DBAPI
    IntegrityError is raised as SQLAlchemy's, as if the statement had gone through Core.
    """

    def __init__(self, conn=None, *, dbapi_conn=None, dialect=None):
        """Statements inside a SQLAlchemy ``Connection``'s transaction (``conn``), or on a
        bare DBAPI connection (see ``transaction``)."""
        if conn is not None:
            dbapi_conn, dialect = conn.connection.dbapi_connection, conn.dialect
        self.dialect = dialect.name
        self.sqlite = self.dialect == "sqlite"
        self._integrity_error = dialect.loaded_dbapi.IntegrityError
        self._dbapi_conn = dbapi_conn
        self._cur = dbapi_conn.cursor()
        self._batch: list | None = None  # Postgres transaction: statements not yet sent

    @classmethod
    @contextmanager
    def transaction(cls, engine):
        """A write transaction on a pooled connection, committed when the block ends.

        On Postgres the statements are queued and leave together, in one round trip, when a
        result is needed (``fetchone``/``fetchall`` on what ``execute`` returned) and at
        the end: BEGIN travels with the first read, and everything after the last read
        travels with the COMMIT. So a purchase is two round trips, and the account row stays
        locked for one of them. The connection is in autocommit meanwhile (BEGIN and COMMIT
        are statements of ours). On SQLite it is BEGIN IMMEDIATE ... COMMIT, writers taking
        turns as everywhere else in txmon.
        """
        pooled = engine.raw_connection()
        dbapi_error = engine.dialect.loaded_dbapi.Error
        try:
            sql = cls(dbapi_conn=pooled.dbapi_connection, dialect=engine.dialect)
            run = sql._sqlite_transaction if sql.sqlite else sql._pg_transaction
            try:
                with run():
                    yield sql
            except sql._integrity_error as exc:
                raise IntegrityError("(ledger transaction)", None, exc) from exc
        except BaseException as exc:
            if engine.dialect.name != "sqlite" and (
                    pooled.dbapi_connection.closed
                    or isinstance(exc, dbapi_error) or isinstance(exc.__cause__, dbapi_error)):
                # After a database error the connection's state is not trusted: when this
                # ran in psycopg's pipeline mode, psycopg could be left believing a statement
                # the server skipped was prepared ("prepared statement ... does not exist"
                # later). Such errors are rare (a replayed purchase): the connection is
                # dropped, the pool opens another.
                pooled.invalidate()
            raise
        finally:
            pooled.close()  # back to the pool (after invalidate: closed for good)

    @contextmanager
    def _pg_transaction(self):
        pg = self._dbapi_conn
        pg.autocommit = True
        self._batch = [("BEGIN", ())]
        try:
            yield
            self._batch.append(("COMMIT", ()))
            self._send()
        except BaseException:
            self._batch = None  # what was not sent is dropped
            if not pg.closed and pg.info.transaction_status != _PG_IDLE:
                pg.execute("ROLLBACK")
            raise
        finally:
            self._batch = None
            if not pg.closed:
                pg.autocommit = False  # as SQLAlchemy's pool expects it

    def _send(self):
        """Send the queued statements in one round trip (psycopg's pipeline mode), each a
        prepared statement: Postgres parses and plans the ledger's fixed SQL once per
        connection, not on every purchase. The cursor is left on the last statement's
        result (the one a ``fetch`` asked for)."""
        batch, self._batch = self._batch, []
        cur = self._cur
        with self._dbapi_conn.pipeline():
            for text, params in batch:
                cur.execute(text, params, prepare=True)
        return cur

    @contextmanager
    def _sqlite_transaction(self):
        self._cur.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._cur.execute("ROLLBACK")
            raise
        self._cur.execute("COMMIT")

    def execute(self, sql: str, params=()):
        """Run ``sql`` (inside a Postgres ``transaction``: queue it); returns the DBAPI
        cursor, or for a queued statement an object whose ``fetchone``/``fetchall`` send
        the queue and read this statement's result."""
        if self._batch is not None:
            self._batch.append((sql, params))
            return _Queued(self, len(self._batch))
        if self.sqlite:
            sql, params = _qmark(sql), [_sqlite_param(p) for p in params]
        try:
            self._cur.execute(sql, params)
        except self._integrity_error as exc:
            raise IntegrityError(sql, params, exc) from exc
        return self._cur

    @contextmanager
    def pipeline(self):
        """Statements whose results are not needed go in one round trip (Postgres)."""
        if self.sqlite:
            yield
            return
        try:
            with self._dbapi_conn.pipeline():
                yield
        except self._integrity_error as exc:
            raise IntegrityError("(pipeline)", None, exc) from exc


_PG_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE, without importing psycopg on SQLite


class _Queued:
    """A statement queued in a RawSql Postgres transaction; reading its result sends it."""

    __slots__ = ("sql", "position")

    def __init__(self, sql: RawSql, position: int):
        self.sql, self.position = sql, position

    def _cursor(self):
        if self.sql._batch is None or len(self.sql._batch) != self.position:
            raise RuntimeError("only the last statement queued can be read back")
        return self.sql._send()

    def fetchone(self):
        return self._cursor().fetchone()

    def fetchall(self):
        return self._cursor().fetchall()


def _not_the_echo_of_a_raised_error(record: logging.LogRecord) -> bool:
    """Drop psycopg's warning that closing a pipeline failed with "pipeline aborted" while
    another error was leaving the block: that error (say, the unique violation of a
    replayed purchase) is what the caller gets and handles; the warning only repeats it."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not (record.msg.startswith("error ignored terminating") and len(args) == 2
                and type(args[1]).__name__ == "PipelineAborted")


logging.getLogger("psycopg").addFilter(_not_the_echo_of_a_raised_error)


@lru_cache(maxsize=64)
def _qmark(sql: str) -> str:
    return sql.replace("%s", "?")


def _sqlite_param(value):
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    return value
