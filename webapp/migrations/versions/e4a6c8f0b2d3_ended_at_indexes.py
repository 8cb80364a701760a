"""Indexes for the overview's "failed in the last 24 h" and "succeeded today", by when a job
ended (export_jobs.finished_at) or an email was sent

Revision ID: e4a6c8f0b2d3
Revises: d2f4a6c8e0b1
Create Date: 2026-12-02 16:00:00.000000

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = 'e4a6c8f0b2d3'
down_revision = 'd2f4a6c8e0b1'
branch_labels = None
depends_on = None


def upgrade():
    op.create_index('ix_export_jobs_state_finished_at', 'export_jobs',
                    ['state', 'finished_at'], unique=False)
    op.create_index('ix_outbound_emails_state_sent_at', 'outbound_emails',
                    ['state', 'sent_at'], unique=False)


def downgrade():
    op.drop_index('ix_outbound_emails_state_sent_at', table_name='outbound_emails')
    op.drop_index('ix_export_jobs_state_finished_at', table_name='export_jobs')
