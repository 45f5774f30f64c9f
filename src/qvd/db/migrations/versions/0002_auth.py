"""authentication: TOTP secret per user, login and address failures for the lockout

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import qvd.db.models

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('address_failures',
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('first_failure_at', qvd.db.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('last_failure_at', qvd.db.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('locked_until', qvd.db.models.UtcDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('address', name=op.f('pk_address_failures'))
    )
    with op.batch_alter_table('address_failures', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_address_failures_last_failure_at'), ['last_failure_at'], unique=False)

    op.create_table('login_failures',
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('login', sa.String(length=255), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('first_failure_at', qvd.db.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('last_failure_at', qvd.db.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('locked_until', qvd.db.models.UtcDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_login_failures_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id', 'login', name=op.f('pk_login_failures'))
    )
    with op.batch_alter_table('login_failures', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_login_failures_last_failure_at'), ['last_failure_at'], unique=False)

    # Nullable columns: SQLite adds them with ALTER TABLE, without rebuilding the users table.
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('totp_secret', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('totp_last_step', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('totp_last_step')
        batch_op.drop_column('totp_secret')

    with op.batch_alter_table('login_failures', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_login_failures_last_failure_at'))

    op.drop_table('login_failures')
    with op.batch_alter_table('address_failures', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_address_failures_last_failure_at'))

    op.drop_table('address_failures')
