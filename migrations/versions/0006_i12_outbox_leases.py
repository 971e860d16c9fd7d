"""Outbox rows carry a run lease, their last error and a dead-letter time; undispatched
rows are found by their due time (a verification's timeout waits in the table).

Revision ID: 0006_i12
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006_i12"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch.drop_index("ix_outbox_undispatched")
        batch.create_index("ix_outbox_due", ["available_at"],
                           postgresql_where=sa.text("dispatched_at IS NULL"),
                           sqlite_where=sa.text("dispatched_at IS NULL"))
        batch.create_index("ix_outbox_dead", ["dead_at"],
                           postgresql_where=sa.text("dead_at IS NOT NULL"),
                           sqlite_where=sa.text("dead_at IS NOT NULL"))
    # Open rows of the combined push-and-email task become one row per channel.
    op.execute("INSERT INTO outbox (user_id, task, payload, available_at, created_at, attempts)"
               " SELECT user_id, 'txmon.notifications.push', payload, available_at, created_at, 0"
               " FROM outbox WHERE task = 'txmon.notifications.deliver_all'"
               " AND completed_at IS NULL")
    op.execute("UPDATE outbox SET task = 'txmon.email.send_notification', dispatched_at = NULL,"
               " attempts = 0 WHERE task = 'txmon.notifications.deliver_all'"
               " AND completed_at IS NULL")


def downgrade():
    with op.batch_alter_table("outbox") as batch:
        batch.drop_index("ix_outbox_dead")
        batch.drop_index("ix_outbox_due")
        batch.create_index("ix_outbox_undispatched", ["id"],
                           postgresql_where=sa.text("dispatched_at IS NULL"),
                           sqlite_where=sa.text("dispatched_at IS NULL"))
        batch.drop_column("last_error")
        batch.drop_column("dead_at")
        batch.drop_column("leased_until")
