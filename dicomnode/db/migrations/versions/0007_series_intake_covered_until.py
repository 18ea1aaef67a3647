"""series intake: the newest receive time the completing verdict saw

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-21 11:20:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series_intake', schema=None) as batch_op:
        batch_op.add_column(sa.Column('covered_until', sa.DateTime(timezone=True), nullable=True))
    # Series completed before this revision keep the watermark they had: their completion time.
    op.execute('UPDATE series_intake SET covered_until = completed_at WHERE completed_at IS NOT NULL')


def downgrade() -> None:
    with op.batch_alter_table('series_intake', schema=None) as batch_op:
        batch_op.drop_column('covered_until')
