"""Reserving a VM (its row and its lease, in the caller's transaction) and finding VMs and where they live."""

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Config
from errors import (InvalidInput, TemplateNotFound, UnknownServer, VmExists, VmInMaintenance, VmInRescue, VmIsRunning,
                    VmNotFound, VmNotInRescue, VmNotPlaced)
from models import Cluster, ClusterServer, San, Site, Subnet, Template, VirtualMachine, Volume
from tasks.inventory import ipam
from workers.san.backend import validate_name

MAX_VM_NAME = 63  # a DNS label: the VM's name is its guest's hostname
DATA_ROLE = "data"  # the role of a VM's data disks (its boot disk is `disk`, its NoCloud seed `seed`)
RESCUE = "rescue"  # the state of a VM running its rescue system
MAINTENANCE = "maintenance"  # the state of a VM running on its SAN host (`vm start --on-san`)
# libvirt's names for a domain that exists and runs in some way on a server (workers.node.domains.STATE_NAMES).
ACTIVE_STATES = frozenset({"running", "blocked", "paused", "shutting down", "suspended"})
# States a running job owns, `error` (a failed job left the VM for an operator or the reconciler), `rescue`
# (its rescue system runs until the operator ends it) and `maintenance` (it runs on the SAN host, which no
# server's events or state sync see): events and the state sync leave them alone.
BUSY_STATES = frozenset({"installing", "deleting", "error", RESCUE, MAINTENANCE})


@dataclass(frozen=True)
class InstallRequest:
    name: str
    template: str
    memory_bytes: int
    vcpus: int
    disk_bytes: int
    subnet: str | None = None
    server: str | None = None
    ssh_keys: list[str] = field(default_factory=list)
    description: str = ""
    # The SAN whose template to use (a VM restored from a backup lives where the backup's disk is).
    san: str | None = None
    ha: bool = True
    ha_priority: int = 0


def reserve_vm(session: Session, config: Config, request: InstallRequest) -> VirtualMachine:
    """Make the VM row (state `installing`) and its lease (from the asked or the default subnet) in
    the caller's transaction."""
    validate_name(request.name)
    if len(request.name) > MAX_VM_NAME:
        raise InvalidInput(f"VM names are at most {MAX_VM_NAME} characters", field="name")
    if session.scalar(select(VirtualMachine.id).where(VirtualMachine.name == request.name)) is not None:
        raise VmExists(f"a VM named {request.name} exists", field="name", vm=request.name)
    server = _asked_server(session, request.server)
    template = _template_for(session, request.template, server, request.san)
    cluster_id = server.cluster_id if server else _cluster_of_san(session, template.san_id)
    vm = VirtualMachine(name=request.name, template_id=template.id, cluster_id=cluster_id,
                        memory_bytes=request.memory_bytes, vcpus=request.vcpus, state="installing",
                        desired_state="running", ssh_keys=list(request.ssh_keys), description=request.description,
                        ha=request.ha, ha_priority=request.ha_priority)
    session.add(vm)
    session.flush()
    subnet = ipam.find_subnet(session, request.subnet) if request.subnet else _default_subnet(session, config)
    if subnet is not None:
        ipam.allocate_lease(session, subnet, vm)
    return vm


def _default_subnet(session: Session, config: Config) -> Subnet | None:
    name = config.raw.get("default_subnet")
    return session.scalar(select(Subnet).where(Subnet.name == name)) if name else None


def _template_for(session: Session, name: str, server: ClusterServer | None, san: str | None = None) -> Template:
    """The template `name` on the asked SAN, or on the SAN of the asked server's site, else on the
    first site (config order) that has it."""
    query = select(Template).join(San, Template.san_id == San.id).where(Template.name == name)
    if san is not None:
        query = query.where(San.name == san)
    if server is not None:
        query = query.where(San.site_id == session.get(Cluster, server.cluster_id).site_id)
    template = session.scalar(query.order_by(San.site_id, Template.id))
    if template is None:
        where = f" at the site of {server.name}" if server is not None else ""
        raise TemplateNotFound(f"no template {name}{where}", field="template")
    return template


def _asked_server(session: Session, name: str | None) -> ClusterServer | None:
    if name is None:
        return None
    server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
    if server is None:
        raise UnknownServer(f"no cluster server {name}", field="server")
    return server


def _cluster_of_san(session: Session, san_id: int) -> int | None:
    site_id = session.get(San, san_id).site_id
    return session.scalar(select(Cluster.id).where(Cluster.site_id == site_id).order_by(Cluster.id))


def vm_volume(vm: VirtualMachine, role: str) -> str:
    """The name of the VM's `role` volume on its SAN: from its UUID, which no user chooses."""
    return f"vm-{vm.uuid}-{role}"


def find_vm(session: Session, name: str) -> VirtualMachine:
    vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == name))
    if vm is None:
        raise VmNotFound(f"no VM {name}", vm=name)
    return vm


def site_and_san(session: Session, vm: VirtualMachine) -> tuple[str, str]:
    """The site and SAN of the VM's disk (after a failover, the DR site's), or, before it has one, of its template."""
    on_disk = session.scalar(select(San).join(Volume, Volume.san_id == San.id)
                             .where(Volume.vm_id == vm.id, Volume.role == "disk").limit(1))
    san = on_disk or session.get(San, session.get(Template, vm.template_id).san_id)
    return session.get(Site, san.site_id).name, san.name


def placed_on(session: Session, vm: VirtualMachine) -> str:
    if vm.server_id is None:
        raise VmNotPlaced(f"{vm.name} is not placed on a server", vm=vm.name)
    return session.get(ClusterServer, vm.server_id).name


def check_rescue(vm: VirtualMachine, end: bool) -> None:
    """Refuse a rescue the VM's state does not allow: it boots a stopped VM, and ends only a rescue."""
    if end and vm.state != RESCUE:
        raise VmNotInRescue(f"{vm.name} is not in rescue (it is {vm.state})", vm=vm.name)
    if not end and vm.state == RESCUE:
        raise VmInRescue(f"{vm.name} is in rescue already (end it: laxcluster vm rescue {vm.name} --end)", vm=vm.name)
    if not end and vm.state in ACTIVE_STATES | BUSY_STATES:
        raise VmIsRunning(f"{vm.name} is {vm.state}: shut it down before booting it into rescue", vm=vm.name)


def refuse_while_away(vm: VirtualMachine) -> None:
    """A VM running its rescue system or on its SAN host neither starts nor moves until that ends."""
    if vm.state == RESCUE:
        raise VmInRescue(f"{vm.name} is in rescue: end it first (laxcluster vm rescue {vm.name} --end)", vm=vm.name)
    if vm.state == MAINTENANCE:
        raise VmInMaintenance(f"{vm.name} runs on its SAN host for maintenance: stop it there first "
                              f"(laxcluster vm shutdown {vm.name})", vm=vm.name)


def check_on_san(vm: VirtualMachine, server_fenced: bool) -> None:
    """Refuse a start on the SAN host the VM's state does not allow: it must be stopped, or on a fenced server
    (which can no longer reach its disks)."""
    refuse_while_away(vm)
    if vm.state in BUSY_STATES or (vm.state in ACTIVE_STATES and not server_fenced):
        raise VmIsRunning(f"{vm.name} is {vm.state}: only a stopped VM (or one on a fenced server) starts on its "
                          "SAN host", vm=vm.name)
