"""Each notification's delivery per channel is a row of notification_deliveries (status,
attempts, last error); notifications.email_status moves there.

Revision ID: 0007_i12
Revises: 0006_i12
"""
import sqlalchemy as sa
from alembic import op

revision = "0007_i12"
down_revision = "0006_i12"
branch_labels = None
depends_on = None

_OPEN_PUSH = {"postgresql": "(o.payload ->> 'notification_id')::bigint",
              "sqlite": "json_extract(o.payload, '$.notification_id')"}


def upgrade():
    op.create_table(
        "notification_deliveries",
        sa.Column("notification_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('pending', 'sent', 'skipped', 'failed')",
                           name=op.f("ck_notification_deliveries_status_known")),
        sa.ForeignKeyConstraint(["notification_id"], ["notifications.id"],
                                name=op.f("fk_notification_deliveries_notification_id_notifications"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("notification_id", "channel",
                                name=op.f("pk_notification_deliveries")),
    )
    nid = _OPEN_PUSH[op.get_bind().dialect.name]
    op.execute("INSERT INTO notification_deliveries"
               " (notification_id, channel, status, attempts, updated_at)"
               " SELECT id, 'email', email_status, 0, created_at FROM notifications")
    # Push kept no state: a notification whose push row is still open is pending, else sent.
    op.execute("INSERT INTO notification_deliveries"
               " (notification_id, channel, status, attempts, updated_at)"
               " SELECT n.id, 'push', CASE WHEN EXISTS (SELECT 1 FROM outbox o"
               " WHERE o.task = 'txmon.notifications.push' AND o.completed_at IS NULL"
               f" AND {nid} = n.id) THEN 'pending' ELSE 'sent' END, 0, n.created_at"
               " FROM notifications n")
    with op.batch_alter_table("notifications") as batch:
        batch.drop_constraint(op.f("ck_notifications_email_status_known"), type_="check")
        batch.drop_column("email_status")


def downgrade():
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("email_status", sa.String(length=16), nullable=False,
                                   server_default="pending"))
    op.execute("UPDATE notifications SET email_status = (SELECT d.status FROM"
               " notification_deliveries d WHERE d.notification_id = notifications.id"
               " AND d.channel = 'email') WHERE EXISTS (SELECT 1 FROM notification_deliveries d"
               " WHERE d.notification_id = notifications.id AND d.channel = 'email')")
    with op.batch_alter_table("notifications") as batch:
        batch.alter_column("email_status", server_default=None)
        batch.create_check_constraint("email_status_known",
                                      "email_status IN ('pending', 'sent', 'skipped', 'failed')")
    op.drop_table("notification_deliveries")
