"""admin console: audit log and the indexes the admin job list pages by

Revision ID: a8c3e5f7b901
Revises: d993831fe06a
Create Date: 2026-11-23 10:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'a8c3e5f7b901'
down_revision = 'd993831fe06a'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('admin_actions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('action', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('lane', sa.String(length=20), nullable=True),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['export_jobs.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('admin_actions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_admin_actions_job_id'), ['job_id'], unique=False)
    with op.batch_alter_table('export_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_export_jobs_state_id', ['state', 'id'], unique=False)
        batch_op.create_index('ix_export_jobs_lane_id', ['lane', 'id'], unique=False)
        batch_op.create_index('ix_export_jobs_dataset_id', ['dataset', 'id'], unique=False)
        batch_op.create_index('ix_export_jobs_user_id_id', ['user_id', 'id'], unique=False)
        batch_op.create_index('ix_export_jobs_created_at', ['created_at'], unique=False)
    with op.batch_alter_table('outbound_emails', schema=None) as batch_op:
        batch_op.create_index('ix_outbound_emails_to_address', ['to_address'], unique=False)


def downgrade():
    with op.batch_alter_table('outbound_emails', schema=None) as batch_op:
        batch_op.drop_index('ix_outbound_emails_to_address')
    with op.batch_alter_table('export_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_export_jobs_created_at')
        batch_op.drop_index('ix_export_jobs_user_id_id')
        batch_op.drop_index('ix_export_jobs_dataset_id')
        batch_op.drop_index('ix_export_jobs_lane_id')
        batch_op.drop_index('ix_export_jobs_state_id')
    with op.batch_alter_table('admin_actions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_admin_actions_job_id'))
    op.drop_table('admin_actions')
