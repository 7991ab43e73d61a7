"""vm ha and ha_priority: whether a VM is restarted elsewhere when its server fails, and in which order

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 17:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('virtual_machines') as batch:
        batch.add_column(sa.Column('ha', sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column('ha_priority', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('virtual_machines') as batch:
        batch.drop_column('ha_priority')
        batch.drop_column('ha')
