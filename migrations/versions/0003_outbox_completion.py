"""Outbox rows record when their task finished, so lost messages can be sent again.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_outbox_unfinished", ["available_at"],
                           postgresql_where=sa.text("completed_at IS NULL"),
                           sqlite_where=sa.text("completed_at IS NULL"))


def downgrade():
    with op.batch_alter_table("outbox") as batch:
        batch.drop_index("ix_outbox_unfinished")
        batch.drop_column("completed_at")
