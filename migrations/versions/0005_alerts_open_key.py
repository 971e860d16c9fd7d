"""Alerts of once-while-open rules carry an open_key, unique among open alerts.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("open_key", sa.String(length=200), nullable=True))
        batch.create_index("uq_alerts_open_key", ["open_key"], unique=True,
                           postgresql_where=sa.text("status = 'open'"),
                           sqlite_where=sa.text("status = 'open'"))


def downgrade():
    with op.batch_alter_table("alerts") as batch:
        batch.drop_index("uq_alerts_open_key")
        batch.drop_column("open_key")
