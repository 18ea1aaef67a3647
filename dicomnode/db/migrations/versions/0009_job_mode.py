"""shadow routes: a job's mode (live, or shadow: results kept, never sent)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 12:20:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('mode', sa.String(length=8), nullable=False, server_default='live')
        )


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('mode')
