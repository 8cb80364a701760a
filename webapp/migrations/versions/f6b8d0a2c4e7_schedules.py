"""Schedules (recurring exports) and the schedule a job is a run of

Revision ID: f6b8d0a2c4e7
Revises: e4a6c8f0b2d3
Create Date: 2026-12-02 19:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = 'f6b8d0a2c4e7'
down_revision = 'e4a6c8f0b2d3'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'schedules',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('org_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=120), nullable=False),
        sa.Column('dataset', sa.String(length=60), nullable=False),
        sa.Column('format', sa.String(length=10), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('date_range', sa.String(length=20), nullable=True),
        sa.Column('range_param', sa.String(length=60), nullable=True),
        sa.Column('range_days', sa.Integer(), nullable=True),
        sa.Column('cron', sa.String(length=120), nullable=False),
        sa.Column('timezone', sa.String(length=64), nullable=False),
        sa.Column('skip_when_empty', sa.Boolean(), nullable=False),
        sa.Column('next_run_at', sa.DateTime(), nullable=False),
        sa.Column('last_run_at', sa.DateTime(), nullable=True),
        sa.Column('last_skipped_at', sa.DateTime(), nullable=True),
        sa.Column('failures', sa.Integer(), nullable=False),
        sa.Column('paused_at', sa.DateTime(), nullable=True),
        sa.Column('pause_reason', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['org_id'], ['organisations.id'], ),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.create_index('ix_schedules_paused_at_next_run_at',
                              ['paused_at', 'next_run_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_schedules_user_id'), ['user_id'], unique=False)

    # Not a batch: on SQLite a batch would copy export_jobs into a new table and drop the old
    # one, which (foreign keys on) would delete or unlink the rows that refer to its jobs.
    bind = op.get_bind()
    if bind.dialect.name == 'sqlite':
        # (kept by a downgrade: see there)
        if 'schedule_id' not in {c['name'] for c in sa.inspect(bind).get_columns('export_jobs')}:
            op.execute('ALTER TABLE export_jobs ADD COLUMN schedule_id INTEGER '
                       'REFERENCES schedules (id)')
    else:
        op.add_column('export_jobs', sa.Column('schedule_id', sa.Integer(), nullable=True))
        op.create_foreign_key('fk_export_jobs_schedule_id_schedules', 'export_jobs',
                              'schedules', ['schedule_id'], ['id'])
    op.create_index('ix_export_jobs_schedule_id', 'export_jobs', ['schedule_id'], unique=False)


def downgrade():
    op.drop_index('ix_export_jobs_schedule_id', table_name='export_jobs')
    if op.get_bind().dialect.name != 'sqlite':
        op.drop_constraint('fk_export_jobs_schedule_id_schedules', 'export_jobs',
                           type_='foreignkey')
        op.drop_column('export_jobs', 'schedule_id')
    else:
        # SQLite cannot drop a column that is a foreign key (and a batch copy would unlink the
        # rows that refer to jobs): there the column stays, NULL everywhere, harmless.
        op.execute('UPDATE export_jobs SET schedule_id = NULL')

    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_schedules_user_id'))
        batch_op.drop_index('ix_schedules_paused_at_next_run_at')

    op.drop_table('schedules')
