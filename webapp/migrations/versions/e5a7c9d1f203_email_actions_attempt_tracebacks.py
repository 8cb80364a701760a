"""admin actions on emails (admin_actions.email_id) and each attempt's traceback

Revision ID: e5a7c9d1f203
Revises: c7e1a3b5d902
Create Date: 2026-12-01 07:10:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'e5a7c9d1f203'
down_revision = 'c7e1a3b5d902'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('admin_actions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('email_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_admin_actions_email_id'), ['email_id'], unique=False)
        batch_op.create_foreign_key('fk_admin_actions_email_id', 'outbound_emails', ['email_id'],
                                    ['id'], ondelete='SET NULL')
    with op.batch_alter_table('job_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('traceback', sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table('job_attempts', schema=None) as batch_op:
        batch_op.drop_column('traceback')
    with op.batch_alter_table('admin_actions', schema=None) as batch_op:
        batch_op.drop_constraint('fk_admin_actions_email_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_admin_actions_email_id'))
        batch_op.drop_column('email_id')
