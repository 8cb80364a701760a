"""delivery guarantees: enqueued_at, running claim and lease, idempotency key

Revision ID: 6a1d0e5c7b21
Revises: 279b0f6da32a
Create Date: 2026-11-22 10:00:00

"""
from alembic import op
import sqlalchemy as sa


revision = '6a1d0e5c7b21'
down_revision = '279b0f6da32a'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('export_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=160), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('idempotency_key', sa.String(length=200), nullable=True))
        batch_op.create_index('ix_export_jobs_user_id_idempotency_key',
                              ['user_id', 'idempotency_key'], unique=False)
    # Jobs that existed before this revision were handed to their lane when created.
    op.execute("UPDATE export_jobs SET enqueued_at = created_at")


def downgrade():
    with op.batch_alter_table('export_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_export_jobs_user_id_idempotency_key')
        batch_op.drop_column('idempotency_key')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('claimed_by')
        batch_op.drop_column('enqueued_at')
