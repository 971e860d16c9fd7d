"""The migrations build exactly the schema the models declare (tables, columns, indexes),
on whichever database the suite runs: a model change without its migration fails here."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.smoke


def test_migrated_schema_matches_the_models(app):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from shared.db import db

    with app.app_context(), db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = [d for d in compare_metadata(context, db.metadata)
                if not (isinstance(d, tuple) and d[0] == "remove_table"
                        and d[1].name == "alembic_version")]
    assert diff == []

