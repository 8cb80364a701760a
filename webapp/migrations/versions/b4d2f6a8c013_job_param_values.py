"""job_param_values: each job's parameter values, so the admin search by a value uses an index

Revision ID: b4d2f6a8c013
Revises: a8c3e5f7b901
Create Date: 2026-11-24 10:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'b4d2f6a8c013'
down_revision = 'a8c3e5f7b901'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('job_param_values',
    sa.Column('value', sa.Text(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['export_jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('value', 'job_id')
    )
    # Existing jobs: every parameter value, lowercase, as jobs.models.param_search_values.
    each = "json_each" if op.get_bind().dialect.name == "sqlite" else "json_each_text"
    op.execute("INSERT INTO job_param_values (value, job_id) "
               "SELECT DISTINCT lower(p.value), export_jobs.id "
               f"FROM export_jobs, {each}(export_jobs.params) AS p")


def downgrade():
    op.drop_table('job_param_values')
