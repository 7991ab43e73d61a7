"""Data protection: backup stores, policies, backups and DR replication pairs."""

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, new_id, utcnow


class BackupStore(Base):
    __tablename__ = "backup_stores"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    kind: Mapped[str] = mapped_column(String(15))
    location: Mapped[str] = mapped_column(String(1023))
    credentials: Mapped[dict] = mapped_column(default=dict)


class BackupPolicy(Base):
    __tablename__ = "backup_policies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    selector: Mapped[dict] = mapped_column(default=dict)
    schedule: Mapped[str] = mapped_column(String(127))
    modes: Mapped[dict] = mapped_column(default=dict)
    store_id: Mapped[int] = mapped_column(ForeignKey("backup_stores.id"))
    retention: Mapped[dict] = mapped_column(default=dict)
    enabled: Mapped[bool] = mapped_column(default=True)
    last_run_at: Mapped[datetime | None]


class Backup(Base):
    __tablename__ = "backups"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # A backup outlives its VM and volume: their names stay, their ids go.
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("virtual_machines.id", ondelete="SET NULL"))
    volume_id: Mapped[int | None] = mapped_column(ForeignKey("volumes.id", ondelete="SET NULL"))
    vm_name: Mapped[str] = mapped_column(String(63), default="", index=True)
    volume_name: Mapped[str] = mapped_column(String(127), default="")
    # The job that took it: the backups of one VM's disks taken together share it and are restored together.
    group_id: Mapped[str | None] = mapped_column(String(36), index=True)
    # The SAN that read the volume: verify and restore run on its queue, a local store lives on it.
    san_name: Mapped[str] = mapped_column(String(63), default="")
    store_id: Mapped[int] = mapped_column(ForeignKey("backup_stores.id"))
    mode: Mapped[str] = mapped_column(String(7))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("backups.id"))
    state: Mapped[str] = mapped_column(String(15), default="writing")
    snapshot: Mapped[str | None] = mapped_column(String(1023))
    chunks: Mapped[int] = mapped_column(default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_read: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(String(2047))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    verified_at: Mapped[datetime | None]


class ReplicationPair(Base):
    __tablename__ = "replication_pairs"

    id: Mapped[int] = mapped_column(primary_key=True)
    volume_id: Mapped[int] = mapped_column(ForeignKey("volumes.id"))
    dr_san_id: Mapped[int] = mapped_column(ForeignKey("sans.id"))
    replica_handle: Mapped[str | None] = mapped_column(String(1023))
    last_snapshot: Mapped[str | None] = mapped_column(String(1023))
    last_synced_at: Mapped[datetime | None]
    schedule: Mapped[str | None] = mapped_column(String(127))
    rpo_seconds: Mapped[int | None]
