"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-26 09:04:26.798017

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    
    op.create_table('accounts',
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('email', sa.String(length=254), nullable=True),
    sa.Column('display_name', sa.String(length=100), nullable=True),
    sa.Column('balance_cents', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('last_seq', sa.BigInteger(), nullable=False),
    sa.Column('low_balance_threshold_cents', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('last_seq >= 0', name=op.f('ck_accounts_last_seq_nonneg')),
    sa.PrimaryKeyConstraint('user_id', name=op.f('pk_accounts'))
    )
    op.create_table('notification_preferences',
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('email_on_credit', sa.Boolean(), nullable=False),
    sa.Column('email_on_debit', sa.Boolean(), nullable=False),
    sa.Column('email_on_refund', sa.Boolean(), nullable=False),
    sa.Column('push_on_credit', sa.Boolean(), nullable=False),
    sa.Column('push_on_debit', sa.Boolean(), nullable=False),
    sa.Column('push_on_refund', sa.Boolean(), nullable=False),
    sa.Column('min_amount_notify_cents', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('user_id', name=op.f('pk_notification_preferences'))
    )
    op.create_table('outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=True),
    sa.Column('task', sa.String(length=100), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('available_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_undispatched', ['id'], unique=False, postgresql_where=sa.text('dispatched_at IS NULL'), sqlite_where=sa.text('dispatched_at IS NULL'))

    op.create_table('reconciliation_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('ran_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('accounts_checked', sa.Integer(), nullable=False),
    sa.Column('mismatches', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reconciliation_runs'))
    )
    op.create_table('transactions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('amount_cents', sa.BigInteger(), nullable=False),
    sa.Column('balance_after_cents', sa.BigInteger(), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('description', sa.String(length=300), nullable=True),
    sa.Column('service', sa.String(length=64), nullable=True),
    sa.Column('verification_id', sa.String(length=64), nullable=True),
    sa.Column('reference', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("type IN ('credit', 'sms_purchase', 'verification_refund', 'adjustment')", name=op.f('ck_transactions_type_known')),
    sa.CheckConstraint('amount_cents <> 0', name=op.f('ck_transactions_amount_nonzero')),
    sa.CheckConstraint('seq > 0', name=op.f('ck_transactions_seq_positive')),
    sa.ForeignKeyConstraint(['user_id'], ['accounts.user_id'], name=op.f('fk_transactions_user_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_transactions')),
    sa.UniqueConstraint('user_id', 'seq', name=op.f('uq_transactions_user_id_seq'))
    )
    with op.batch_alter_table('transactions', schema=None) as batch_op:
        batch_op.create_index('ix_transactions_created_at', ['created_at'], unique=False)
        batch_op.create_index('uq_transactions_type_reference', ['type', 'reference'], unique=True, postgresql_where=sa.text('reference IS NOT NULL'), sqlite_where=sa.text('reference IS NOT NULL'))
        batch_op.create_index('uq_transactions_verification_type', ['verification_id', 'type'], unique=True, postgresql_where=sa.text('verification_id IS NOT NULL'), sqlite_where=sa.text('verification_id IS NOT NULL'))

    op.create_table('alerts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=True),
    sa.Column('rule', sa.String(length=64), nullable=False),
    sa.Column('transaction_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('dedup_key', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('acknowledged_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('note', sa.String(length=500), nullable=True),
    sa.CheckConstraint("status IN ('open', 'acknowledged')", name=op.f('ck_alerts_status_known')),
    sa.ForeignKeyConstraint(['transaction_id'], ['transactions.id'], name=op.f('fk_alerts_transaction_id_transactions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alerts')),
    sa.UniqueConstraint('dedup_key', name=op.f('uq_alerts_dedup_key'))
    )
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.create_index('ix_alerts_status_id', ['status', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_alerts_user_id'), ['user_id'], unique=False)

    op.create_table('notifications',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('title', sa.String(length=100), nullable=False),
    sa.Column('message', sa.String(length=500), nullable=False),
    sa.Column('link', sa.String(length=200), nullable=True),
    sa.Column('icon', sa.String(length=32), nullable=True),
    sa.Column('amount_cents', sa.BigInteger(), nullable=True),
    sa.Column('transaction_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('read', sa.Boolean(), nullable=False),
    sa.Column('email_status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("email_status IN ('pending', 'sent', 'skipped', 'failed')", name=op.f('ck_notifications_email_status_known')),
    sa.CheckConstraint("type IN ('credit_added', 'credit_deducted', 'instant_refund', 'balance_adjusted', 'suspicious_activity', 'low_balance')", name=op.f('ck_notifications_type_known')),
    sa.ForeignKeyConstraint(['transaction_id'], ['transactions.id'], name=op.f('fk_notifications_transaction_id_transactions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_notifications')),
    sa.UniqueConstraint('transaction_id', name=op.f('uq_notifications_transaction_id'))
    )
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.create_index('ix_notifications_user_id_id', ['user_id', 'id'], unique=False)
        batch_op.create_index('ix_notifications_user_unread', ['user_id'], unique=False, postgresql_where=sa.text('NOT read'), sqlite_where=sa.text('NOT read'))

    op.create_table('verifications',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('service_name', sa.String(length=64), nullable=False),
    sa.Column('country', sa.String(length=64), nullable=False),
    sa.Column('cost_cents', sa.BigInteger(), nullable=False),
    sa.Column('timeout_seconds', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_reason', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('charge_transaction_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('refund_transaction_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'completed', 'cancelled', 'failed', 'timed_out')", name=op.f('ck_verifications_status_known')),
    sa.CheckConstraint('cost_cents > 0', name=op.f('ck_verifications_cost_positive')),
    sa.ForeignKeyConstraint(['charge_transaction_id'], ['transactions.id'], name=op.f('fk_verifications_charge_transaction_id_transactions')),
    sa.ForeignKeyConstraint(['refund_transaction_id'], ['transactions.id'], name=op.f('fk_verifications_refund_transaction_id_transactions')),
    sa.ForeignKeyConstraint(['user_id'], ['accounts.user_id'], name=op.f('fk_verifications_user_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_verifications'))
    )
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.create_index('ix_verifications_pending_expiry', ['expires_at'], unique=False, postgresql_where=sa.text("status = 'pending'"), sqlite_where=sa.text("status = 'pending'"))
        batch_op.create_index(batch_op.f('ix_verifications_user_id'), ['user_id'], unique=False)




def downgrade():
    
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_verifications_user_id'))
        batch_op.drop_index('ix_verifications_pending_expiry', postgresql_where=sa.text("status = 'pending'"), sqlite_where=sa.text("status = 'pending'"))

    op.drop_table('verifications')
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_index('ix_notifications_user_unread', postgresql_where=sa.text('NOT read'), sqlite_where=sa.text('NOT read'))
        batch_op.drop_index('ix_notifications_user_id_id')

    op.drop_table('notifications')
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alerts_user_id'))
        batch_op.drop_index('ix_alerts_status_id')

    op.drop_table('alerts')
    with op.batch_alter_table('transactions', schema=None) as batch_op:
        batch_op.drop_index('uq_transactions_verification_type', postgresql_where=sa.text('verification_id IS NOT NULL'), sqlite_where=sa.text('verification_id IS NOT NULL'))
        batch_op.drop_index('uq_transactions_type_reference', postgresql_where=sa.text('reference IS NOT NULL'), sqlite_where=sa.text('reference IS NOT NULL'))
        batch_op.drop_index('ix_transactions_created_at')

    op.drop_table('transactions')
    op.drop_table('reconciliation_runs')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_undispatched', postgresql_where=sa.text('dispatched_at IS NULL'), sqlite_where=sa.text('dispatched_at IS NULL'))

    op.drop_table('outbox')
    op.drop_table('notification_preferences')
    op.drop_table('accounts')

