"""merge delivery guarantees and outbound emails

Revision ID: d993831fe06a
Revises: 6a1d0e5c7b21, 6c1e9a4d2b7f
Create Date: 2026-11-22 02:33:22.199613

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'd993831fe06a'
down_revision = ('6a1d0e5c7b21', '6c1e9a4d2b7f')
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
