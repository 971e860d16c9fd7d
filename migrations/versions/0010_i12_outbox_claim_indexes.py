"""Outbox indexes shaped by the statements that use them: the balance loop's claim reads an
index of waiting balance updates only; the relay's claim reads due rows in its own order
(available_at, id), so a burst due at one instant is not sorted whole for each claim; rows
in flight (the lapsed sweep) are found by dispatch time, so the runner's statements by id
have only the primary key to use; completed rows are found by completion time for the
retention job.

Revision ID: 0010_i12
Revises: 0009_i14
"""
import sqlalchemy as sa
from alembic import op

revision = "0010_i12"
down_revision = "0009_i14"
branch_labels = None
depends_on = None

BALANCES = "dispatched_at IS NULL AND task = 'txmon.realtime.publish_balance'"
DUE = "dispatched_at IS NULL"
IN_FLIGHT = "completed_at IS NULL AND dispatched_at IS NOT NULL"
COMPLETED = "completed_at IS NOT NULL"


def upgrade():
    with op.batch_alter_table("outbox") as batch:
        batch.drop_index("ix_outbox_unfinished")
        batch.drop_index("ix_outbox_due")
        batch.create_index("ix_outbox_due", ["available_at", "id"],
                           postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE))
        batch.create_index("ix_outbox_in_flight", ["dispatched_at"],
                           postgresql_where=sa.text(IN_FLIGHT), sqlite_where=sa.text(IN_FLIGHT))
        batch.create_index("ix_outbox_balances", ["available_at", "id"],
                           postgresql_where=sa.text(BALANCES), sqlite_where=sa.text(BALANCES))
        batch.create_index("ix_outbox_completed", ["completed_at"],
                           postgresql_where=sa.text(COMPLETED), sqlite_where=sa.text(COMPLETED))


def downgrade():
    with op.batch_alter_table("outbox") as batch:
        batch.drop_index("ix_outbox_completed")
        batch.drop_index("ix_outbox_balances")
        batch.drop_index("ix_outbox_in_flight")
        batch.drop_index("ix_outbox_due")
        batch.create_index("ix_outbox_due", ["available_at"],
                           postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE))
        batch.create_index("ix_outbox_unfinished", ["available_at"],
                           postgresql_where=sa.text("completed_at IS NULL"),
                           sqlite_where=sa.text("completed_at IS NULL"))
