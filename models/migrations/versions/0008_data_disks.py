"""data disks: a volume's label (the operator's name for a VM's data disk; disks are found by volume id, never
by it), and a backup's group (the backups of a VM's disks taken together by one job)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 17:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('volumes') as batch:
        batch.add_column(sa.Column('label', sa.String(length=63), nullable=True))
    with op.batch_alter_table('backups') as batch:
        batch.add_column(sa.Column('group_id', sa.String(length=36), nullable=True))
        batch.create_index('ix_backups_group_id', ['group_id'])


def downgrade() -> None:
    with op.batch_alter_table('backups') as batch:
        batch.drop_index('ix_backups_group_id')
        batch.drop_column('group_id')
    with op.batch_alter_table('volumes') as batch:
        batch.drop_column('label')
