"""Index transactions by (user_id, created_at) for the alert rules' window counts.

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("transactions") as batch:
        batch.create_index("ix_transactions_user_created", ["user_id", "created_at"])


def downgrade():
    with op.batch_alter_table("transactions") as batch:
        batch.drop_index("ix_transactions_user_created")
