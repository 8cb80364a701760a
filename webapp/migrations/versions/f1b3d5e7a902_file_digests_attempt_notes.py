"""each published file's SHA-256 on its job, a note on each attempt (e.g. "started over"), and
when an email's last attempt began (a send that never ended is tried again)

Revision ID: f1b3d5e7a902
Revises: e5a7c9d1f203
Create Date: 2026-12-02 04:20:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'f1b3d5e7a902'
down_revision = 'e5a7c9d1f203'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('export_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sha256', sa.String(length=64), nullable=True))
    with op.batch_alter_table('job_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('note', sa.Text(), nullable=True))
    with op.batch_alter_table('outbound_emails', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_at', sa.DateTime(), nullable=True))


def downgrade():
    with op.batch_alter_table('outbound_emails', schema=None) as batch_op:
        batch_op.drop_column('claimed_at')
    with op.batch_alter_table('job_attempts', schema=None) as batch_op:
        batch_op.drop_column('note')
    with op.batch_alter_table('export_jobs', schema=None) as batch_op:
        batch_op.drop_column('sha256')
