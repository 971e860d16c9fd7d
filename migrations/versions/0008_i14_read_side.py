"""Per-(account, type) transaction counts kept by a trigger (history totals without a scan),
and the indexes the history's type filter and the account timeline page on.

Revision ID: 0008_i14
Revises: 0007_i12
"""
import sqlalchemy as sa
from alembic import op

revision = "0008_i14"
down_revision = "0007_i12"
branch_labels = None
depends_on = None

PG_FUNCTION = """
CREATE FUNCTION txmon_count_transactions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    INSERT INTO account_tx_counts (user_id, type, n) VALUES (NEW.user_id, NEW.type, 1)
      ON CONFLICT (user_id, type) DO UPDATE SET n = account_tx_counts.n + 1;
  END IF;
  IF TG_OP IN ('DELETE', 'UPDATE') THEN
    UPDATE account_tx_counts SET n = n - 1 WHERE user_id = OLD.user_id AND type = OLD.type;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER transactions_count AFTER INSERT OR DELETE OR UPDATE OF user_id, type
  ON transactions FOR EACH ROW EXECUTE FUNCTION txmon_count_transactions();
"""

SQLITE_TRIGGERS = (
    """CREATE TRIGGER transactions_count_insert AFTER INSERT ON transactions BEGIN
         INSERT INTO account_tx_counts (user_id, type, n) VALUES (NEW.user_id, NEW.type, 1)
           ON CONFLICT (user_id, type) DO UPDATE SET n = n + 1;
       END""",
    """CREATE TRIGGER transactions_count_delete AFTER DELETE ON transactions BEGIN
         UPDATE account_tx_counts SET n = n - 1 WHERE user_id = OLD.user_id AND type = OLD.type;
       END""",
    """CREATE TRIGGER transactions_count_update AFTER UPDATE OF user_id, type ON transactions
       BEGIN
         UPDATE account_tx_counts SET n = n - 1 WHERE user_id = OLD.user_id AND type = OLD.type;
         INSERT INTO account_tx_counts (user_id, type, n) VALUES (NEW.user_id, NEW.type, 1)
           ON CONFLICT (user_id, type) DO UPDATE SET n = n + 1;
       END""",
)


def upgrade():
    op.create_table(
        "account_tx_counts",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "type", name="pk_account_tx_counts"),
    )
    op.execute("INSERT INTO account_tx_counts (user_id, type, n)"
               " SELECT user_id, type, count(*) FROM transactions GROUP BY user_id, type")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)
    with op.batch_alter_table("transactions") as batch:
        batch.create_index("ix_transactions_user_type_seq", ["user_id", "type", "seq"])
    for table in ("verifications", "notifications", "alerts"):
        with op.batch_alter_table(table) as batch:
            batch.create_index(f"ix_{table}_user_created", ["user_id", "created_at"])
    with op.batch_alter_table("verifications") as batch:
        batch.create_index("ix_verifications_user_updated", ["user_id", "updated_at"])


def downgrade():
    with op.batch_alter_table("verifications") as batch:
        batch.drop_index("ix_verifications_user_updated")
    for table in ("alerts", "notifications", "verifications"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_user_created")
    with op.batch_alter_table("transactions") as batch:
        batch.drop_index("ix_transactions_user_type_seq")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER transactions_count ON transactions")
        op.execute("DROP FUNCTION txmon_count_transactions()")
    else:
        for name in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER transactions_count_{name}")
    op.drop_table("account_tx_counts")
