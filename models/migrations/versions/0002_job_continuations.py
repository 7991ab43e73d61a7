"""job continuations: a parent waits for its children without holding a worker

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 13:30:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('step', sa.String(length=191), nullable=True))
        batch.add_column(sa.Column('waiting', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column('continuation', sa.JSON(), nullable=False, server_default='{}'))
        batch.create_index(batch.f('ix_jobs_waiting'), ['waiting'])
        batch.create_unique_constraint(batch.f('uq_jobs_parent_id_step'), ['parent_id', 'step'])


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_constraint(batch.f('uq_jobs_parent_id_step'), type_='unique')
        batch.drop_index(batch.f('ix_jobs_waiting'))
        batch.drop_column('continuation')
        batch.drop_column('waiting')
        batch.drop_column('step')
