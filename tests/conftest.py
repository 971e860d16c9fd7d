"""Test fixtures: one fresh database per run (Postgres by default, SQLite for the smoke run),
migrated with the project's Alembic migrations, emptied before each test."""
from __future__ import annotations

import os
import shutil
import uuid

import pytest
from sqlalchemy import create_engine, text

# Before anything imports the package, so its asserts report like the tests' own.
pytest.register_assert_rewrite("tests.support")

from tests.support import Api  # noqa: E402
from tests.support.common import strict  # noqa: E402
from tests.support.db import empty_tables  # noqa: E402

pytest_plugins = ["tests.support.workers"]

REQUIRED_TOOLS = ("redis-server", "chromium")


def pytest_sessionstart(session):
    """In CI every tool the suite drives must be there: the run stops before any test."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if strict() and missing:
        raise pytest.UsageError(f"strict test run (CI/TXMON_TEST_STRICT) without {missing}")


PG_ADMIN_URL = os.environ.get("TXMON_TEST_PG_ADMIN_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _database_url(tmp_path_factory) -> tuple[str, callable]:
    if os.environ.get("TXMON_TEST_DB", "postgres") == "sqlite":
        path = tmp_path_factory.mktemp("db") / "txmon.db"
        return f"sqlite:///{path}", lambda: None
    name = f"txmon_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop():
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name, drop


@pytest.fixture(scope="session")
def database_url(tmp_path_factory):
    url, drop = _database_url(tmp_path_factory)
    yield url
    drop()


@pytest.fixture(scope="session")
def app(database_url, redis_server):
    """The API in-process, its rate limits counted in the session's own redis-server."""
    from flask_migrate import upgrade

    from api_service import create_app
    from shared.config import TestConfig

    app = create_app(TestConfig(database_url, redis_server.url()).as_dict())
    with app.app_context():
        upgrade()
    yield app
    with app.app_context():
        from shared.db import db

        db.engine.dispose()


@pytest.fixture(autouse=True)
def _clean_tables(request):
    if "app" not in request.fixturenames:
        yield
        return
    app = request.getfixturevalue("app")
    empty_tables(app)
    # Each test starts with fresh rate-limit buckets: the service key's bucket would
    # otherwise fill with every earlier test's calls.
    from api_service import limiter

    with app.app_context():
        limiter.reset()
    yield


@pytest.fixture
def ctx(app):
    """An app context for calling services directly."""
    with app.app_context():
        yield app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def api(app, client):
    """Contract-level helper: headers, tokens, account set-up (tests/support/api.py)."""
    return Api(app, client)


@pytest.fixture
def sockets(stack):
    """Websocket clients on a test module's ``stack`` (tests/support/stack.py), closed after."""
    from tests.support.stack import Sockets

    s = Sockets(stack)
    yield s
    s.close_all()
