"""The admin monitor's roll-ups: per-minute, quarter-hour and hour aggregates by type, each
account's latest transaction time, each account's count per type and hour (date-filtered
history totals), the roll-up watermark, and the minutes to recompute after an
UPDATE or DELETE of a transaction (a trigger on those only: inserts, the purchase path, pay
nothing). The roll-ups start empty; the periodic job (shared/rollups.py) fills them from id 1
on, and the monitor reads raw rows above the watermark meanwhile, so its figures stay exact.

Revision ID: 0009_i14
Revises: 0008_i14
"""
import sqlalchemy as sa
from alembic import op

revision = "0009_i14"
down_revision = "0008_i14"
branch_labels = None
depends_on = None

PG_FUNCTION = """
CREATE FUNCTION txmon_monitor_dirty() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO monitor_rollup_dirty (minute, user_id)
    VALUES (floor(extract(epoch FROM OLD.created_at))::bigint / 60, OLD.user_id);
  IF TG_OP = 'UPDATE' THEN
    INSERT INTO monitor_rollup_dirty (minute, user_id)
      VALUES (floor(extract(epoch FROM NEW.created_at))::bigint / 60, NEW.user_id);
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER transactions_monitor_dirty
  AFTER DELETE OR UPDATE OF user_id, type, amount_cents, created_at
  ON transactions FOR EACH ROW EXECUTE FUNCTION txmon_monitor_dirty();
"""

_OLD = ("INSERT INTO monitor_rollup_dirty (minute, user_id) VALUES"
        " (CAST(strftime('%s', substr(OLD.created_at, 1, 19)) AS INTEGER) / 60, OLD.user_id);")
_NEW = _OLD.replace("OLD.", "NEW.")
SQLITE_TRIGGERS = (
    f"CREATE TRIGGER transactions_monitor_dirty_delete AFTER DELETE ON transactions"
    f" BEGIN {_OLD} END",
    f"CREATE TRIGGER transactions_monitor_dirty_update"
    f" AFTER UPDATE OF user_id, type, amount_cents, created_at ON transactions"
    f" BEGIN {_OLD} {_NEW} END",
)


def upgrade():
    op.create_table(
        "monitor_rollups",
        sa.Column("grain_s", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("grain_s", "bucket", "type", name="pk_monitor_rollups"),
    )
    op.create_table(
        "monitor_user_last",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_monitor_user_last"),
    )
    op.create_index("ix_monitor_user_last_last_at", "monitor_user_last", ["last_at"])
    op.create_table(
        "account_hour_counts",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("hour", sa.BigInteger(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "type", "hour", name="pk_account_hour_counts"),
    )
    op.create_table(
        "monitor_rollup_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("watermark_id", sa.BigInteger(), nullable=False),
        sa.Column("pending_id", sa.BigInteger(), nullable=True),
        sa.Column("pending_writers", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_monitor_rollup_state"),
    )
    op.create_table(
        "monitor_rollup_dirty",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_monitor_rollup_dirty"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER transactions_monitor_dirty ON transactions")
        op.execute("DROP FUNCTION txmon_monitor_dirty()")
    else:
        for name in ("delete", "update"):
            op.execute(f"DROP TRIGGER transactions_monitor_dirty_{name}")
    op.drop_table("monitor_rollup_dirty")
    op.drop_table("monitor_rollup_state")
    op.drop_table("account_hour_counts")
    op.drop_index("ix_monitor_user_last_last_at", table_name="monitor_user_last")
    op.drop_table("monitor_user_last")
    op.drop_table("monitor_rollups")
