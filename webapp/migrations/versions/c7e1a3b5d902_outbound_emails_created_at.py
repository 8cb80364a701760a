"""outbound_emails.created_at index: the admin list's date filter bounds email ids through it

Revision ID: c7e1a3b5d902
Revises: b4d2f6a8c013
Create Date: 2026-11-24 11:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'c7e1a3b5d902'
down_revision = 'b4d2f6a8c013'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('outbound_emails', schema=None) as batch_op:
        batch_op.create_index('ix_outbound_emails_created_at', ['created_at'], unique=False)


def downgrade():
    with op.batch_alter_table('outbound_emails', schema=None) as batch_op:
        batch_op.drop_index('ix_outbound_emails_created_at')
