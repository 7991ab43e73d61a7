"""A VM run on its SAN host itself, for maintenance when no cluster server can run it (`laxcluster vm start
NAME --on-san`), on the `san.<site>` queue.

The SAN host's own libvirt (`uri` in the SAN's config entry) opens the VM's volumes by path instead of over
iSCSI. The VM is marked `maintenance` (wanted stopped: HA leaves it alone) before anything else, and every
export of the SAN leaves a VM in maintenance out of its ACLs; then its target is locked (no initiator in
their ACL, no session left), so no cluster server can open its disks while it runs on the SAN. Stopped there
(`vm shutdown` or `vm destroy`), its domain on the SAN host goes and its target lets the site's servers in again.
"""

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from config import Config, SanConfig
from errors import NoSanHost
from models import ClusterServer, VirtualMachine, Volume, utcnow
from tasks.context import JobContext
from tasks.inventory.specs import vm_spec
from tasks.inventory.vms import MAINTENANCE, check_on_san, find_vm
from tasks.kinds import OfVm, san_of_vm
from tasks.san.storage import site_initiators, target_for
from tasks.san.volumes import SanPlace, san_place, vm_target_iqn
from tasks.workflow import workflow
from workers.node import domains
from workers.node.domain_xml import LocalDisk, domain_xml

SHUTDOWN_TIMEOUT_S = 60
# Remembered once a run may have defined the domain on the SAN host: an undo must then remove it first.
DEFINED = "defined on"


def checked_for_san(session: Session, config: Config, vm: VirtualMachine) -> str:
    """The SAN whose host may run `vm` now; VmIsRunning, VmInRescue or VmInMaintenance if its state does not
    allow it, NoSanHost if that SAN has no host to run it."""
    server = session.get(ClusterServer, vm.server_id) if vm.server_id else None
    check_on_san(vm, server_fenced=server is not None and server.fenced_at is not None)
    san = san_of_vm(session, OfVm(vm=vm.name))
    host_uri(config.san(san)[1])
    return san


def host_uri(san: SanConfig) -> str:
    """The libvirt URI of the SAN's host; NoSanHost if its config entry gives none."""
    if not san.uri:
        raise NoSanHost(f"SAN {san.name} runs no VMs: give its config entry the `uri` of its host's libvirt",
                        san=san.name)
    return san.uri


def undo_start_on_san(ctx: JobContext) -> None:
    """A failed or cancelled start: the domain on the SAN host (if a run got as far as defining it) and the lock go."""
    place = san_place(ctx.rt.config, ctx.params.san)
    end_maintenance(ctx, place, defined=ctx.remembered(DEFINED) is not None)


@workflow("start-on-san", cleanup=undo_start_on_san)
def start_on_san(ctx: JobContext) -> dict[str, Any]:
    """Mark the VM in maintenance, lock its target, define its domain on the SAN host from local paths, start it."""
    place = san_place(ctx.rt.config, ctx.params.san)
    uri = host_uri(place.san)
    # Asked first, so a host that does not answer fails the job before anything changed.
    domains.states(uri)
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        vm.state, vm.desired_state = MAINTENANCE, "stopped"
        uuid, target = vm.uuid, vm_target_iqn(ctx.rt.config, place.site.name, vm)
        xml = domain_xml(vm_spec(session, vm, place.san.hypervisor, lambda volume: local_disk(place, volume), ()))
    ctx.phase("lock the exports", progress=20)
    dropped = target_for(place.san).lock_out(target)
    ctx.phase("define", progress=50)
    ctx.once(DEFINED, lambda: place.san.name)
    domains.define(uri, xml)
    ctx.phase("start", progress=70)
    state = domains.start(uri, uuid)
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        vm.domain_id, vm.state_updated_at = state.domain_id, utcnow()
    return {"host": place.san.name, "state": MAINTENANCE, "target": target, "sessions_dropped": dropped}


@workflow("power-on-san")
def power_on_san(ctx: JobContext) -> dict[str, Any]:
    """Shut down (ACPI, with a deadline), reboot or destroy the VM on its SAN host; stopped, its maintenance ends."""
    place, action = san_place(ctx.rt.config, ctx.params.san), ctx.params.action
    uri = host_uri(place.san)
    with ctx.session() as session:
        uuid = find_vm(session, ctx.params.vm).uuid
    ctx.phase(action, progress=20)
    if action == "reboot":
        return {"state": MAINTENANCE, "domain_id": domains.reboot(uri, uuid).domain_id}
    if action == "shutdown":
        domains.shutdown(uri, uuid, float(ctx.params.timeout_s or SHUTDOWN_TIMEOUT_S))
    ctx.phase("end maintenance", progress=70)
    end_maintenance(ctx, place, defined=True)
    return {"state": "shut off"}


def end_maintenance(ctx: JobContext, place: SanPlace, *, defined: bool) -> None:
    """Remove the VM's domain from the SAN host (when one may be `defined`), let the site's servers reach its
    target again, and record it shut off. Only a VM in maintenance: anything else is not this job's."""
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        if vm.state != MAINTENANCE:
            return
        uuid, initiators = vm.uuid, site_initiators(session, place.site)
        target = vm_target_iqn(ctx.rt.config, place.site.name, vm)
    if defined:
        domains.undefine(host_uri(place.san), uuid)
    target_for(place.san).bind_initiators(target, initiators)
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        vm.state, vm.domain_id, vm.state_updated_at = "shut off", None, utcnow()


def local_disk(place: SanPlace, volume: Volume) -> LocalDisk:
    return LocalDisk(Path(place.backend.path_for_export(volume.backend_handle)), volume.iscsi_lun)

