"""sessions on the server, the login guessing limit, the audit log names people and organisations

Revision ID: c3d5e7f9a1b2
Revises: b0bdb52fb0d4
Create Date: 2026-12-02 12:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'c3d5e7f9a1b2'
down_revision = 'b0bdb52fb0d4'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'user_sessions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('token_hash', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('ended_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_user_sessions_user_id_users')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_user_sessions')),
        sa.UniqueConstraint('token_hash', name=op.f('uq_user_sessions_token_hash')),
    )
    with op.batch_alter_table('user_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_user_sessions_user_id'), ['user_id'], unique=False)
    op.create_table(
        'login_failures',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('email', sa.String(length=254), nullable=False),
        sa.Column('address', sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_login_failures')),
    )
    with op.batch_alter_table('login_failures', schema=None) as batch_op:
        batch_op.create_index('ix_login_failures_email_at', ['email', 'at'], unique=False)
        batch_op.create_index('ix_login_failures_address_at', ['address', 'at'], unique=False)
    with op.batch_alter_table('admin_actions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('subject_user_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('org_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_admin_actions_subject_user_id'), ['subject_user_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_admin_actions_org_id'), ['org_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_admin_actions_subject_user_id_users'), 'users', ['subject_user_id'], ['id'])
        batch_op.create_foreign_key(batch_op.f('fk_admin_actions_org_id_organisations'), 'organisations', ['org_id'], ['id'])


def downgrade():
    with op.batch_alter_table('admin_actions', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_admin_actions_org_id_organisations'), type_='foreignkey')
        batch_op.drop_constraint(batch_op.f('fk_admin_actions_subject_user_id_users'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_admin_actions_org_id'))
        batch_op.drop_index(batch_op.f('ix_admin_actions_subject_user_id'))
        batch_op.drop_column('org_id')
        batch_op.drop_column('subject_user_id')
    with op.batch_alter_table('login_failures', schema=None) as batch_op:
        batch_op.drop_index('ix_login_failures_address_at')
        batch_op.drop_index('ix_login_failures_email_at')
    op.drop_table('login_failures')
    with op.batch_alter_table('user_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_user_sessions_user_id'))
    op.drop_table('user_sessions')
