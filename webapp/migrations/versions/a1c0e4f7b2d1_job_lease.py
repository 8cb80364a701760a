"""job lease: running jobs hold a lease their worker renews

Revision ID: a1c0e4f7b2d1
Revises: 279b0f6da32a
Create Date: 2026-11-22 02:20:00.000000

"""
import sqlalchemy as sa
from alembic import op

revision = "a1c0e4f7b2d1"
down_revision = "279b0f6da32a"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("export_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
        batch_op.create_index("ix_export_jobs_lease_expires_at", ["lease_expires_at"])


def downgrade():
    with op.batch_alter_table("export_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_export_jobs_lease_expires_at")
        batch_op.drop_column("lease_expires_at")
