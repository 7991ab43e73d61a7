"""server fenced_at: a server fenced off at its site's SAN until activate re-admits it

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 17:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cluster_servers') as batch:
        batch.add_column(sa.Column('fenced_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('cluster_servers') as batch:
        batch.drop_column('fenced_at')
