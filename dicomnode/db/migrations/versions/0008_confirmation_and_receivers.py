"""completion you can trust: the confirmation window on jobs and series; receivers by name

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 19:15:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('confirm_after', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('series_intake', schema=None) as batch_op:
        batch_op.add_column(sa.Column('confirm_after', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('associations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('receiver_id', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_associations_receiver_open', ['receiver_id', 'outcome'])


def downgrade() -> None:
    with op.batch_alter_table('associations', schema=None) as batch_op:
        batch_op.drop_index('ix_associations_receiver_open')
        batch_op.drop_column('receiver_id')
    with op.batch_alter_table('series_intake', schema=None) as batch_op:
        batch_op.drop_column('confirm_after')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('confirm_after')
