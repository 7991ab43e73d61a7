"""server hypervisor kind: kvm, qemu (TCG) or xen, from the config or a probe, with the evidence

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 17:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cluster_servers') as batch:
        batch.add_column(sa.Column('hypervisor', sa.String(length=15), nullable=True))
        batch.add_column(sa.Column('hypervisor_evidence', sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('cluster_servers') as batch:
        batch.drop_column('hypervisor_evidence')
        batch.drop_column('hypervisor')
