"""What the cluster runs: templates, virtual machines and their volumes."""

import secrets
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, new_id, utcnow


class Template(Base):
    """A read-only volume on a SAN that new VMs are cloned from.

    `boot` is empty for templates that boot from their own disk; for direct-boot templates
    (the lab's `tiny`) it holds the kernel, initrd and cmdline paths on the cluster servers.
    """

    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("name", "san_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    os: Mapped[str] = mapped_column(String(63), default="linux")
    default_size_bytes: Mapped[int] = mapped_column(BigInteger)
    customization: Mapped[str] = mapped_column(String(31), default="nocloud")
    san_id: Mapped[int | None] = mapped_column(ForeignKey("sans.id"))
    backend_handle: Mapped[str | None] = mapped_column(String(1023))
    boot: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def new_vnc_password() -> str:
    return secrets.token_urlsafe(6)[:8]


class VirtualMachine(Base):
    __tablename__ = "virtual_machines"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    uuid: Mapped[str] = mapped_column(String(36), default=new_id, unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    template_id: Mapped[int | None] = mapped_column(ForeignKey("templates.id"))
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("clusters.id"))
    server_id: Mapped[int | None] = mapped_column(ForeignKey("cluster_servers.id"))
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    vcpus: Mapped[int]
    hypervisor: Mapped[str] = mapped_column(String(15), default="qemu")
    state: Mapped[str] = mapped_column(String(31), default="defining", index=True)
    domain_id: Mapped[int | None]
    cpu_time_ns: Mapped[int | None] = mapped_column(BigInteger)
    state_updated_at: Mapped[datetime | None]
    desired_state: Mapped[str] = mapped_column(String(31), default="running")
    # Restarted on another server of its cluster when its server fails (higher priority first).
    ha: Mapped[bool] = mapped_column(default=True)
    ha_priority: Mapped[int] = mapped_column(default=0)
    # The graphical console's password (VNC takes at most 8 characters); None until the VM's next start.
    vnc_password: Mapped[str | None] = mapped_column(String(8), default=new_vnc_password)
    # Raised by every failover: a job started for an older generation (on the old primary site) is refused.
    generation: Mapped[int] = mapped_column(default=1)
    ssh_keys: Mapped[list] = mapped_column(default=list)
    tags: Mapped[list] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    volumes: Mapped[list["Volume"]] = relationship(back_populates="vm")


class Volume(Base):
    """A disk on a SAN, exported as an iSCSI LUN."""

    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("san_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(127))
    san_id: Mapped[int] = mapped_column(ForeignKey("sans.id"))
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("virtual_machines.id"), index=True)
    vm: Mapped[VirtualMachine | None] = relationship(back_populates="volumes")
    role: Mapped[str] = mapped_column(String(15), default="disk")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    backend_handle: Mapped[str] = mapped_column(String(1023))
    iscsi_target: Mapped[str | None] = mapped_column(String(223))
    iscsi_lun: Mapped[int | None]
    # A data disk's operator-given label (shown, never used to find the volume: that is by id).
    label: Mapped[str | None] = mapped_column(String(63))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
