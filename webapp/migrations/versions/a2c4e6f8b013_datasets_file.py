"""datasets from a file: the key of each organisation's rows in the team's data, and the
definition a job's rows were written with

Revision ID: a2c4e6f8b013
Revises: f1b3d5e7a902
Create Date: 2026-12-02 08:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'a2c4e6f8b013'
down_revision = 'f1b3d5e7a902'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('organisations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('data_key', sa.String(length=200), nullable=True))
    with op.batch_alter_table('export_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('definition', sa.String(length=64), nullable=True))


def downgrade():
    with op.batch_alter_table('export_jobs', schema=None) as batch_op:
        batch_op.drop_column('definition')
    with op.batch_alter_table('organisations', schema=None) as batch_op:
        batch_op.drop_column('data_key')
