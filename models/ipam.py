"""The network DB: subnets and the address leases of VMs."""

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base


class Subnet(Base):
    __tablename__ = "subnets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    cidr: Mapped[str] = mapped_column(String(49))
    gateway: Mapped[str | None] = mapped_column(String(45))
    dns: Mapped[list] = mapped_column(default=list)
    range_start: Mapped[str] = mapped_column(String(45))
    range_end: Mapped[str] = mapped_column(String(45))
    mac_prefix: Mapped[str] = mapped_column(String(17), default="52:54:00")


class Lease(Base):
    __tablename__ = "leases"
    __table_args__ = (UniqueConstraint("subnet_id", "ip"), UniqueConstraint("mac"))

    id: Mapped[int] = mapped_column(primary_key=True)
    subnet_id: Mapped[int] = mapped_column(ForeignKey("subnets.id"))
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("virtual_machines.id"), index=True)
    mac: Mapped[str] = mapped_column(String(17))
    ip: Mapped[str] = mapped_column(String(45))
    hostname: Mapped[str] = mapped_column(String(63))
