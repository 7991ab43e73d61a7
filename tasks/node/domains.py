"""Node-side work, run on the `node.<server>` queue: a VM's domain on that server."""

from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from celery.signals import worker_ready
from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Config
from errors import DiskNotFound, HypervisorUnknown, RescueUnavailable
from models import ClusterServer, Lease, San, Subnet, Template, VirtualMachine, Volume, utcnow
from models.compute import new_vnc_password
from models.db import transaction
from tasks import runtime
from tasks.app import app
from tasks.context import JobContext
from tasks.inventory.dr import refuse_if_not_primary
from tasks.inventory.vmnet import bridge_for
from tasks.inventory.specs import direct_boot, vm_spec
from tasks.inventory.vms import BUSY_STATES, DATA_ROLE, RESCUE
from tasks.queues import node_queue
from tasks.runtime import Runtime
from tasks.workflow import workflow
from workers.node import domains
from workers.node.domain_xml import (DirectBoot, DomainSpec, Hypervisor, IscsiDisk, Nic, Vnc, data_dev, data_disk_xml,
                                     domain_xml)
from workers.node.events import LifecycleWatcher

ISCSI_PORT = 3260
BOOT_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 60


def server_kind(server: ClusterServer) -> Hypervisor:
    """The hypervisor kind a domain on `server` must have; HypervisorUnknown before the server's first refresh."""
    if server.hypervisor is None:
        raise HypervisorUnknown(f"the hypervisor kind of {server.name} is not known yet: refresh it "
                                "(laxcluster servers refresh) or set it in the configuration", server=server.name)
    return server.hypervisor


def domain_spec(session: Session, vm: VirtualMachine, server: ClusterServer, config: Config) -> DomainSpec:
    """The libvirt definition of `vm` as it should run on `server`: its SAN LUNs, NIC (on the server's bridge
    for the lease's VM network) and boot; the domain type is the server's hypervisor kind."""
    lease = session.scalar(select(Lease).where(Lease.vm_id == vm.id))
    nics = (nic(session, config, lease, server),) if lease else ()
    spec = vm_spec(session, vm, server_kind(server), lambda volume: iscsi_disk(session, volume, server), nics)
    return spec if spec.hypervisor == "xen" else replace(spec, vnc=vnc_display(vm, server))


def vnc_display(vm: VirtualMachine, server: ClusterServer) -> Vnc:
    """The VM's graphical console: a VNC display on the server's management address (its libvirt URI's host),
    behind the VM's password (made now for a VM from before there were any)."""
    if vm.vnc_password is None:
        vm.vnc_password = new_vnc_password()
    return Vnc(urlsplit(server.libvirt_uri).hostname or "127.0.0.1", vm.vnc_password)


def iscsi_disk(session: Session, volume: Volume, server: ClusterServer) -> IscsiDisk:
    """How `server` reaches the volume's LUN: the SAN's portal, logging in with the server's initiator name."""
    host, _, port = session.get(San, volume.san_id).portal.rpartition(":")
    return IscsiDisk(volume.iscsi_target, volume.iscsi_lun, host, int(port or ISCSI_PORT), server.initiator_iqn)


def nic(session: Session, config: Config, lease: Lease, server: ClusterServer) -> Nic:
    subnet = session.get(Subnet, lease.subnet_id).name
    return Nic(lease.mac, bridge=bridge_for(config, subnet, server.name))


def vm_and_server(session: Session, vm_name: str, server_name: str) -> tuple[VirtualMachine, ClusterServer]:
    vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == vm_name))
    server = session.scalar(select(ClusterServer).where(ClusterServer.name == server_name))
    return vm, server


def record_state(session: Session, vm: VirtualMachine, state: domains.DomainState | None) -> None:
    vm.state = state.state if state else "undefined"
    vm.domain_id = state.domain_id if state else None
    vm.cpu_time_ns = state.cpu_time_ns if state else None
    vm.state_updated_at = utcnow()


@workflow("start-domain")
def start_domain(ctx: JobContext) -> dict[str, Any]:
    """Define the VM's domain on this server from the inventory and start it; NotPrimary if the VM's disks are at
    another site (it failed over) or it failed over since the job was planned."""
    with ctx.session() as session:
        vm, server = vm_and_server(session, ctx.params.vm, ctx.params.server)
        refuse_if_not_primary(session, vm, server.cluster.site_id, ctx.params.generation)
        spec = domain_spec(session, vm, server, ctx.rt.config)
        xml = domain_xml(spec)
    ctx.phase("define", progress=20)
    domains.define(server.libvirt_uri, xml)
    ctx.phase("start", progress=60)
    state = domains.start(server.libvirt_uri, vm.uuid)
    with ctx.session() as session:
        vm = session.get(VirtualMachine, vm.id)
        vm.server_id, vm.hypervisor = server.id, spec.hypervisor
        record_state(session, vm, state)
    return {"state": state.state, "domain_id": state.domain_id}


@workflow("rescue-domain")
def rescue_domain(ctx: JobContext) -> dict[str, Any]:
    """Replace the VM's domain on this server by its rescue system, started; with `end`, stop the rescue
    system and define the VM's own domain again, stopped."""
    end = ctx.params.end
    with ctx.session() as session:
        vm, server = vm_and_server(session, ctx.params.vm, ctx.params.server)
        spec = domain_spec(session, vm, server, ctx.rt.config)
        xml = domain_xml(spec if end else replace(spec, boot=rescue_boot(session, ctx.rt.config)))
    ctx.phase("stop", progress=10)
    domains.destroy(server.libvirt_uri, vm.uuid)
    ctx.phase("define", progress=40)
    domains.define(server.libvirt_uri, xml)
    if not end:
        ctx.phase("start", progress=60)
        # Marked first: the lifecycle event of the start must find the VM in a state the syncs leave alone.
        with ctx.session() as session:
            session.get(VirtualMachine, vm.id).state = RESCUE
        domains.start(server.libvirt_uri, vm.uuid)
    state = domains.domain_state(server.libvirt_uri, vm.uuid)
    with ctx.session() as session:
        vm = session.get(VirtualMachine, vm.id)
        record_state(session, vm, state)
        if not end:
            # Wanted stopped: the HA watcher must not restart a VM under repair elsewhere.
            vm.state, vm.desired_state = RESCUE, "stopped"
        return {"state": vm.state}


def rescue_boot(session: Session, config: Config) -> DirectBoot:
    """The rescue system: the `[templates] rescue` template's kernel and initramfs, told to stop at a shell."""
    name = config.section("templates").get("rescue", "tiny")
    template = session.scalar(select(Template).where(Template.name == name))
    boot = template.boot if template is not None else None
    if not boot or not boot.get("kernel"):
        raise RescueUnavailable(f"no rescue system: template {name} has no direct-boot kernel "
                                "([templates] rescue names the template)", template=name)
    return direct_boot(boot, "laxcluster.rescue")


@workflow("power-domain")
def power_domain(ctx: JobContext) -> dict[str, Any]:
    """Shut down (ACPI, with a deadline), reboot or destroy the VM's domain on this server."""
    action = ctx.params.action
    with ctx.session() as session:
        vm, server = vm_and_server(session, ctx.params.vm, ctx.params.server)
    ctx.phase(action, progress=20)
    if action == "shutdown":
        domains.shutdown(server.libvirt_uri, vm.uuid, float(ctx.params.timeout_s or SHUTDOWN_TIMEOUT_S))
    elif action == "reboot":
        domains.reboot(server.libvirt_uri, vm.uuid)
    else:
        domains.destroy(server.libvirt_uri, vm.uuid)
    state = domains.domain_state(server.libvirt_uri, vm.uuid)
    with ctx.session() as session:
        record_state(session, session.get(VirtualMachine, vm.id), state)
    return {"state": state.state if state else "undefined"}


@workflow("probe-boot")
def probe_boot(ctx: JobContext) -> dict[str, Any]:
    """Did the VM's guest come up? With the template's console probe (`boot.probe`: what to send, what to
    expect), the guest must answer it; without one, the domain must still run after a grace period."""
    with ctx.session() as session:
        vm, server = vm_and_server(session, ctx.params.vm, ctx.params.server)
        template = session.get(Template, vm.template_id)
        probe = (template.boot or {}).get("probe") if template else None
    ctx.phase("watch the guest", progress=10)
    up, detail = domains.came_up(server.libvirt_uri, vm.uuid, probe, float(ctx.params.timeout_s or BOOT_TIMEOUT_S))
    return {"came_up": up, "detail": detail}


@workflow("remove-domain")
def remove_domain(ctx: JobContext) -> dict[str, Any]:
    """Destroy and undefine the VM's domain on this server (nothing to do if it is not there)."""
    with ctx.session() as session:
        vm, server = vm_and_server(session, ctx.params.vm, ctx.params.server)
    if vm is not None:
        domains.undefine(server.libvirt_uri, vm.uuid)
    return {"undefined": ctx.params.vm, "server": server.name}


def data_disk_device(ctx: JobContext) -> tuple[VirtualMachine, ClusterServer, str, str]:
    """The VM, its server, and the `<disk>` XML and device name of the job's data disk (`volume_id`)."""
    with ctx.session() as session:
        vm, server = vm_and_server(session, ctx.params.vm, ctx.params.server)
        volume = session.get(Volume, ctx.params.volume_id)
        if vm is None or volume is None or volume.vm_id != vm.id or volume.role != DATA_ROLE:
            raise DiskNotFound(f"VM {ctx.params.vm} has no data disk {ctx.params.volume_id}",
                               vm=ctx.params.vm, disk=ctx.params.volume_id)
        disk, kind = iscsi_disk(session, volume, server), server_kind(server)
    return vm, server, data_disk_xml(disk, kind), data_dev(kind, disk)


@workflow("attach-disk")
def attach_disk(ctx: JobContext) -> dict[str, Any]:
    """Hot-plug a data disk into the VM's running domain (and its definition), or into the definition only."""
    vm, server, xml, dev = data_disk_device(ctx)
    ctx.phase("attach", progress=20)
    how = domains.attach_disk(server.libvirt_uri, vm.uuid, xml, dev)
    return {"attached": how, "device": dev}


@workflow("detach-disk")
def detach_disk(ctx: JobContext) -> dict[str, Any]:
    """Unplug a data disk from the VM's domain (live, waiting for the guest to let go, and its definition)."""
    vm, server, xml, dev = data_disk_device(ctx)
    ctx.phase("detach", progress=20)
    return {"detached": domains.detach_disk(server.libvirt_uri, vm.uuid, xml, dev), "device": dev}


@app.task(name="laxcluster.sync_vm_states")
def sync_vm_states(server_name: str) -> dict[str, str]:
    """Run on a server's node queue by the reconciler: correct the DB's VM states from libvirt."""
    rt = runtime.current()
    with transaction(rt.sessions) as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == server_name))
        return sync_states(session, server) if server is not None else {}


@worker_ready.connect
def watch_lifecycle_events(sender, **_: object) -> None:
    """A node worker follows its servers' domain lifecycle events, so the DB hears of a VM that
    stops or crashes by itself at once (the reconciler's periodic sync catches anything missed)."""
    queues = {queue.name for queue in sender.task_consumer.queues}
    rt = runtime.current()
    for _, _, server in rt.config.servers():
        if node_queue(server.name) in queues:
            LifecycleWatcher(server.uri, lambda uuid, server=server.name: _sync_one(rt, server, uuid)).start()


def _sync_one(rt: Runtime, server_name: str, uuid: str) -> None:
    with transaction(rt.sessions) as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.uuid == uuid))
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == server_name))
        if vm is None or server is None or vm.server_id != server.id or vm.state in BUSY_STATES:
            return
        record_state(session, vm, domains.domain_state(server.libvirt_uri, uuid))


def sync_states(session: Session, server: ClusterServer) -> dict[str, str]:
    """Make the DB's VM states on `server` match what its libvirt says; return the VMs that changed."""
    live = {state.uuid: state for state in domains.states(server.libvirt_uri)}
    changed = {}
    for vm in session.scalars(select(VirtualMachine).where(VirtualMachine.server_id == server.id)):
        state = live.get(vm.uuid)
        before = vm.state
        if before in BUSY_STATES:
            continue
        record_state(session, vm, state)
        if vm.state != before:
            changed[vm.name] = f"{before} -> {vm.state}"
    return changed
