"""Data protection: backup stores, policies, backups and DR replication pairs."""

from datetime import datetime

from sqlalchemy import BigInteger, Float, ForeignKey, String
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


class Replication(Base):
    """A VM replicated to the other site's SAN: all its disks shipped together to `peer_san`, as replica points.

    `peer_san` is the side holding the replicas: the DR site's SAN, and after a failover the old primary's
    (failback ships back to it). `base_point` is the newest point both sides hold, the base of the next ship.
    """

    __tablename__ = "replications"

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("virtual_machines.id", ondelete="CASCADE"), unique=True)
    peer_san_id: Mapped[int] = mapped_column(ForeignKey("sans.id"))
    # "continuous" (ship every few seconds) or "scheduled" (when `schedule`, a cron line, is due).
    mode: Mapped[str] = mapped_column(String(15))
    schedule: Mapped[str | None] = mapped_column(String(127))
    rpo_target_s: Mapped[int]
    bandwidth_limit_bytes_s: Mapped[int | None] = mapped_column(BigInteger)
    keep: Mapped[int] = mapped_column(default=3)
    # False while a failover or failback owns the VM's disks (no ship is dispatched).
    enabled: Mapped[bool] = mapped_column(default=True)
    base_point: Mapped[str | None] = mapped_column(String(63))
    next_seq: Mapped[int] = mapped_column(default=1)
    last_error: Mapped[str | None] = mapped_column(String(2047))
    last_attempt_at: Mapped[datetime | None]
    bytes_behind: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReplicaDisk(Base):
    """One replicated volume: its copy on the peer SAN is `replica` (the same name), up to date as of `base_point`."""

    __tablename__ = "replica_disks"

    id: Mapped[int] = mapped_column(primary_key=True)
    replication_id: Mapped[int] = mapped_column(ForeignKey("replications.id", ondelete="CASCADE"), index=True)
    volume_id: Mapped[int] = mapped_column(ForeignKey("volumes.id", ondelete="CASCADE"), unique=True)
    replica: Mapped[str] = mapped_column(String(127))
    base_point: Mapped[str | None] = mapped_column(String(63))


class ReplicaPoint(Base):
    """A consistent moment of a VM's disks held on `san`: every replicated disk has snapshot `<replica>@<name>`."""

    __tablename__ = "replica_points"

    id: Mapped[int] = mapped_column(primary_key=True)
    replication_id: Mapped[int] = mapped_column(ForeignKey("replications.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    san_id: Mapped[int] = mapped_column(ForeignKey("sans.id"))
    # When the source snapshots were taken: the moment the replica holds (its age is the RPO).
    taken_at: Mapped[datetime]
    shipped_at: Mapped[datetime] = mapped_column(default=utcnow)
    bytes_changed: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
