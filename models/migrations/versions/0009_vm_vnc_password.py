"""a VM's VNC password: its graphical console's, set on its domain's VNC display and given to the web
console's noVNC (VNC passwords are at most 8 characters); filled in at the next start for older VMs

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 06:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('virtual_machines') as batch:
        batch.add_column(sa.Column('vnc_password', sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('virtual_machines') as batch:
        batch.drop_column('vnc_password')
