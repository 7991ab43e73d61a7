"""DR replication: a VM's replication to the peer SAN (replications), its replicated disks (replica_disks)
and the consistent points on the peer (replica_points); a generation per VM, raised by each failover. The
unused per-volume replication_pairs table goes.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table('replication_pairs')
    with op.batch_alter_table('virtual_machines') as batch:
        batch.add_column(sa.Column('generation', sa.Integer(), nullable=False, server_default='1'))
    op.create_table(
        'replications',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('vm_id', sa.Integer(), nullable=False),
        sa.Column('peer_san_id', sa.Integer(), nullable=False),
        sa.Column('mode', sa.String(length=15), nullable=False),
        sa.Column('schedule', sa.String(length=127), nullable=True),
        sa.Column('rpo_target_s', sa.Integer(), nullable=False),
        sa.Column('bandwidth_limit_bytes_s', sa.BigInteger(), nullable=True),
        sa.Column('keep', sa.Integer(), nullable=False),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('base_point', sa.String(length=63), nullable=True),
        sa.Column('next_seq', sa.Integer(), nullable=False),
        sa.Column('last_error', sa.String(length=2047), nullable=True),
        sa.Column('last_attempt_at', sa.DateTime(), nullable=True),
        sa.Column('bytes_behind', sa.BigInteger(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['vm_id'], ['virtual_machines.id'], name=op.f('fk_replications_vm_id_virtual_machines'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['peer_san_id'], ['sans.id'], name=op.f('fk_replications_peer_san_id_sans')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_replications')),
        sa.UniqueConstraint('vm_id', name=op.f('uq_replications_vm_id')),
    )
    op.create_table(
        'replica_disks',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('replication_id', sa.Integer(), nullable=False),
        sa.Column('volume_id', sa.Integer(), nullable=False),
        sa.Column('replica', sa.String(length=127), nullable=False),
        sa.Column('base_point', sa.String(length=63), nullable=True),
        sa.ForeignKeyConstraint(['replication_id'], ['replications.id'],
                                name=op.f('fk_replica_disks_replication_id_replications'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['volume_id'], ['volumes.id'], name=op.f('fk_replica_disks_volume_id_volumes'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_replica_disks')),
        sa.UniqueConstraint('volume_id', name=op.f('uq_replica_disks_volume_id')),
    )
    op.create_index(op.f('ix_replica_disks_replication_id'), 'replica_disks', ['replication_id'])
    op.create_table(
        'replica_points',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('replication_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=63), nullable=False),
        sa.Column('san_id', sa.Integer(), nullable=False),
        sa.Column('taken_at', sa.DateTime(), nullable=False),
        sa.Column('shipped_at', sa.DateTime(), nullable=False),
        sa.Column('bytes_changed', sa.BigInteger(), nullable=False),
        sa.Column('bytes_sent', sa.BigInteger(), nullable=False),
        sa.Column('seconds', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['replication_id'], ['replications.id'],
                                name=op.f('fk_replica_points_replication_id_replications'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['san_id'], ['sans.id'], name=op.f('fk_replica_points_san_id_sans')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_replica_points')),
    )
    op.create_index(op.f('ix_replica_points_replication_id'), 'replica_points', ['replication_id'])


def downgrade() -> None:
    op.drop_table('replica_points')
    op.drop_table('replica_disks')
    op.drop_table('replications')
    with op.batch_alter_table('virtual_machines') as batch:
        batch.drop_column('generation')
    op.create_table(
        'replication_pairs',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('volume_id', sa.Integer(), nullable=False),
        sa.Column('dr_san_id', sa.Integer(), nullable=False),
        sa.Column('replica_handle', sa.String(length=1023), nullable=True),
        sa.Column('last_snapshot', sa.String(length=1023), nullable=True),
        sa.Column('last_synced_at', sa.DateTime(), nullable=True),
        sa.Column('schedule', sa.String(length=127), nullable=True),
        sa.Column('rpo_seconds', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['dr_san_id'], ['sans.id'], name=op.f('fk_replication_pairs_dr_san_id_sans')),
        sa.ForeignKeyConstraint(['volume_id'], ['volumes.id'], name=op.f('fk_replication_pairs_volume_id_volumes')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_replication_pairs')),
    )
