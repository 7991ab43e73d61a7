"""Inventory rows for API tests, made directly in the DB (the config already made sites, servers and SANs)."""

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import AuditEvent, ClusterServer, Job, Lease, San, Subnet, Template, VirtualMachine, Volume

GIB = 1 << 30


def template(session: Session, name: str = "tiny", san: str = "san-a", **fields: Any) -> Template:
    row = Template(name=name, san_id=_id(session, San, san), default_size_bytes=fields.pop("default_size_bytes", GIB),
                   backend_handle=f"templates/{name}", **fields)
    session.add(row)
    session.flush()
    return row


def subnet(session: Session, name: str = "lan", cidr: str = "10.40.0.0/24", start: str = "10.40.0.10",
           end: str = "10.40.0.200", **fields: Any) -> Subnet:
    row = Subnet(name=name, cidr=cidr, gateway=fields.pop("gateway", "10.40.0.1"), range_start=start, range_end=end, **fields)
    session.add(row)
    session.flush()
    return row


def vm(session: Session, name: str, *, template_row: Template | None = None, server: str | None = None,
       state: str = "shut off", disk_bytes: int | None = None, lease_in: Subnet | None = None, ip: str | None = None,
       **fields: Any) -> VirtualMachine:
    """A VM row, with a disk volume on san-a and a lease in `lease_in` when asked."""
    row = VirtualMachine(name=name, memory_bytes=fields.pop("memory_bytes", 256 << 20), vcpus=fields.pop("vcpus", 1),
                         state=state, template_id=template_row and template_row.id,
                         server_id=server and _id(session, ClusterServer, server), **fields)
    session.add(row)
    session.flush()
    if disk_bytes is not None:
        session.add(Volume(name=f"{name}-disk", san_id=_id(session, San, "san-a"), vm_id=row.id, role="disk",
                           size_bytes=disk_bytes, backend_handle=f"{name}-disk"))
    if lease_in is not None:
        mac = "52:54:00:%02x:%02x:%02x" % tuple(row.id.to_bytes(3, "big"))
        session.add(Lease(subnet_id=lease_in.id, vm_id=row.id, mac=mac, ip=ip, hostname=name))
    session.flush()
    return row


def counts(session: Session) -> dict[str, int]:
    """How many VMs, volumes, leases, subnets, templates, jobs and audit events there are."""
    models = {"vms": VirtualMachine, "volumes": Volume, "leases": Lease, "subnets": Subnet, "templates": Template,
              "jobs": Job, "audit": AuditEvent}
    return {key: session.scalar(select(func.count()).select_from(model)) for key, model in models.items()}


def _id(session: Session, model: type, name: str) -> int:
    return session.scalar(select(model.id).where(model.name == name))
