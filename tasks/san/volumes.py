"""SAN-side work, run on the `san.<site>` queue: VM disks and seeds, their iSCSI export, templates, resize, facts.

A VM's volumes are named from its UUID (`vm-<uuid>-disk`, `vm-<uuid>-seed`, target `...:<site>.vm-<uuid>`),
a template's `tpl-<random hex>`: never from a name a user chose, so no VM or template can reach another's
volume; a volume is reused or deleted only when no other row owns it. Every step is idempotent (an
existing volume or export of this VM is kept), so a re-run after a crash converges.
"""

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.signals import worker_ready
from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Config, SanConfig, SiteConfig
from errors import NotFound, TargetNotFound, TemplateExists, VmNotStopped, VolumeExists
from models import Lease, San, Site, Subnet, Template, VirtualMachine, Volume
from models.protection import Backup, Replication
from tasks import runtime
from tasks.app import app
from tasks.context import JobContext
from tasks.inventory.dr import primary_san, refuse_if_not_primary
from tasks.inventory.vms import MAINTENANCE, find_vm, vm_volume
from tasks.queues import san_queue
from tasks.san.storage import backend_for, handle_in_use, site_initiators, target_for
from tasks.workflow import workflow
from workers.san.backend import VolumeBackend
from workers.san.images import open_importable, write_image
from workers.san.seed import write_seed
from workers.san.shrink import safe_shrink
from workers.san.tgt import Export, validate_iqn

DISK_LUN, SEED_LUN = 1, 2
# A shrink rewrites the filesystem: only while no domain can use the disk (not paused, not shutting down).
SHRINKABLE_STATES = ("shut off", "undefined")


@dataclass(frozen=True)
class SanPlace:
    site: SiteConfig
    san: SanConfig
    backend: VolumeBackend


def san_place(config: Config, san_name: str) -> SanPlace:
    site, san = config.san(san_name)
    return SanPlace(site, san, backend_for(san))


def vm_target_iqn(config: Config, site: str, vm: VirtualMachine) -> str:
    return validate_iqn(f"{config.raw['iqn_prefix']}:{site}.vm-{vm.uuid}")


# -- VM disks -------------------------------------------------------------------------------------

@workflow("prepare-vm-disks")
def prepare_vm_disks(ctx: JobContext) -> dict[str, Any]:
    """Clone the template to the VM's disk, grow it, write its NoCloud seed and export both to the site."""
    with ctx.session() as session:
        vm, template, lease, subnet = _vm_parts(session, ctx.params.vm)
        san = session.get(San, template.san_id)
        place = san_place(ctx.rt.config, san.name)
    ctx.phase("clone template", progress=10)
    disk, seed = vm_volume(vm, "disk"), vm_volume(vm, "seed")
    with ctx.session() as session:
        for name in (disk, seed):
            refuse_if_owned_by_another(session, san.id, name, vm)
    if not place.backend.exists(disk):
        place.backend.clone(template.backend_handle, disk)
    size = ctx.params.disk_bytes
    if place.backend.size(disk) < size:
        ctx.phase("grow disk", progress=40)
        place.backend.resize(disk, size)
    ctx.phase("write seed", progress=60)
    network = ctx.rt.config.vm_network_of(subnet.name) if subnet else None
    seed = _write_seed(place.backend, seed, vm, lease, subnet, dhcp=bool(network and network.dhcp))
    ctx.phase("export", progress=80)
    iqn = vm_target_iqn(ctx.rt.config, place.site.name, vm)
    with ctx.session() as session:
        export_luns(place, iqn, {DISK_LUN: disk, SEED_LUN: seed}, site_initiators(session, place.site))
    with ctx.session() as session:
        record_volume(session, san.id, vm.id, disk, "disk", place.backend.size(disk), iqn, DISK_LUN)
        record_volume(session, san.id, vm.id, seed, "seed", place.backend.size(seed), iqn, SEED_LUN)
    return {"target": iqn, "disk": disk, "seed": seed}


@workflow("remove-vm-disks")
def remove_vm_disks(ctx: JobContext) -> dict[str, Any]:
    """Unexport the VM's target and delete its volumes and their backup anchors (whatever of them exists)."""
    place = san_place(ctx.rt.config, ctx.params.san)
    with ctx.session() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == ctx.params.vm))
        if vm is None:
            return {"deleted": []}
        rows = owned_volumes(session, place.san.name, vm)
        handles = sorted({row.backend_handle for row in rows} | {vm_volume(vm, "disk"), vm_volume(vm, "seed")})
        anchors = anchors_of(session, [row.id for row in rows])
        iqn = vm_target_iqn(ctx.rt.config, place.site.name, vm)
    ctx.phase("unexport", progress=20)
    target_for(place.san).unexport(iqn, force=True)
    ctx.phase("delete backup anchors", progress=40)
    for snap in anchors:
        place.backend.delete_snapshot(snap)
    ctx.phase("delete volumes", progress=60)
    for handle in handles:
        place.backend.delete(handle)
    with ctx.session() as session:
        forget_volumes(session, owned_volumes(session, place.san.name, session.get(VirtualMachine, vm.id)), anchors)
    return {"deleted": handles, "anchors": anchors}


def forget_volumes(session: Session, rows: list[Volume], anchors: list[str]) -> None:
    """Drop volume rows whose snapshots `anchors` were deleted; their backups stay, pointing at neither (the
    foreign key empties their volume_id)."""
    for backup in session.scalars(select(Backup).where(Backup.snapshot.in_(anchors))):
        backup.snapshot = None
    for row in rows:
        session.delete(row)
    session.flush()


def owned_volumes(session: Session, san_name: str, vm: VirtualMachine) -> list[Volume]:
    """The VM's volume rows on the SAN, and rows named for its UUID that no VM owns yet (a restored disk)."""
    mine = (Volume.vm_id == vm.id) | (Volume.vm_id.is_(None) & Volume.name.in_([vm_volume(vm, "disk"), vm_volume(vm, "seed")]))
    return list(session.scalars(select(Volume).join(San).where(San.name == san_name, mine)))


def anchors_of(session: Session, volume_ids: list[int]) -> list[str]:
    """The backup snapshots (anchors) still kept on the SAN for these volumes."""
    return sorted(set(session.scalars(select(Backup.snapshot).where(Backup.volume_id.in_(volume_ids),
                                                                     Backup.snapshot.is_not(None)))))


def refuse_if_owned_by_another(session: Session, san_id: int, name: str, vm: VirtualMachine) -> None:
    owner = session.scalar(select(Volume.vm_id).where(Volume.san_id == san_id, Volume.name == name))
    if owner not in (None, vm.id):
        raise VolumeExists(f"volume {name} belongs to another VM (id {owner})", volume=name)


def _vm_parts(session: Session, name: str) -> tuple[VirtualMachine, Template, Lease | None, Subnet | None]:
    vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == name))
    if vm is None:
        raise NotFound(f"no VM {name}", vm=name)
    template = session.get(Template, vm.template_id)
    lease = session.scalar(select(Lease).where(Lease.vm_id == vm.id))
    subnet = session.get(Subnet, lease.subnet_id) if lease else None
    return vm, template, lease, subnet


def _write_seed(backend: VolumeBackend, seed: str, vm: VirtualMachine, lease: Lease | None,
                subnet: Subnet | None, dhcp: bool) -> str:
    """The seed names the lease's MAC; its address, gateway and DNS servers only when no DHCP server hands
    them out (the seed then says `type: dhcp`)."""
    static = lease is not None and subnet is not None and not dhcp
    return write_seed(backend, seed, hostname=vm.name, mac=lease.mac if lease else None,
                      ip_cidr=f"{lease.ip}/{subnet.cidr.split('/')[1]}" if static else None,
                      gateway=subnet.gateway if static else None, ssh_keys=list(vm.ssh_keys),
                      dns=list(subnet.dns) if static else [])


def export_luns(place: SanPlace, iqn: str, luns: dict[int, str], initiators: tuple[str, ...]) -> None:
    tgt = target_for(place.san)
    tgt.ensure_target(iqn)
    for lun, handle in luns.items():
        tgt.export_lun(iqn, lun, place.backend.path_for_export(handle))
    tgt.bind_initiators(iqn, initiators)


def record_volume(session: Session, san_id: int, vm_id: int, name: str, role: str, size: int, iqn: str, lun: int,
                  label: str | None = None) -> Volume:
    """Make or update the VM's volume row `name` with its role, size and LUN; return it (with its id)."""
    volume = session.scalar(select(Volume).where(Volume.san_id == san_id, Volume.name == name))
    if volume is None:
        volume = Volume(san_id=san_id, name=name, backend_handle=name)
        session.add(volume)
    volume.vm_id, volume.role, volume.size_bytes, volume.iscsi_target, volume.iscsi_lun = vm_id, role, size, iqn, lun
    volume.label = label
    session.flush()
    return volume


# -- templates, resize, facts -------------------------------------------------------------------------

def template_volume(ctx: JobContext) -> str:
    """The new template's volume: a name chosen once per job, never from the template's name, so an import
    can only ever write to (and its undo delete) a volume it made itself."""
    return ctx.once("template-volume", lambda: f"tpl-{uuid.uuid4().hex}")


def undo_import(ctx: JobContext) -> None:
    """Drop the volume this import made, unless a template row stands on it (compared by handle, not by name)."""
    handle = ctx.remembered("template-volume")
    if handle is None:
        return
    place = san_place(ctx.rt.config, ctx.params.san)
    with ctx.session() as session:
        san_id = session.scalar(select(San.id).where(San.name == place.san.name))
        if not handle_in_use(session, san_id, handle):
            place.backend.delete(handle)


@workflow("import-template", cleanup=undo_import)
def import_template(ctx: JobContext) -> dict[str, Any]:
    """Convert an image file from the SAN host's import directory into a new template volume and register it."""
    name, fmt = ctx.params.name, ctx.params.format
    place = san_place(ctx.rt.config, ctx.params.san)
    handle = template_volume(ctx)
    with ctx.session() as session:
        san = session.scalar(select(San).where(San.name == place.san.name))
        template = session.scalar(select(Template).where(Template.name == name, Template.san_id == san.id))
        if template is not None and template.backend_handle != handle:
            raise TemplateExists(f"template {name} exists on {san.name}", name=name, san=san.name)
    ctx.phase("convert image", progress=10)
    with open_importable(ctx.rt.config.import_dir, Path(ctx.params.source_path)) as source:
        write_image(place.backend, handle, source, fmt)
    size = place.backend.size(handle)
    with ctx.session() as session:
        template = session.scalar(select(Template).where(Template.name == name, Template.san_id == san.id))
        if template is None:
            template = Template(name=name, san_id=san.id)
            session.add(template)
        template.backend_handle, template.os = handle, ctx.params.os
        template.default_size_bytes = ctx.params.default_size_bytes or size
        template.boot = ctx.params.boot or {}
    return {"template": name, "san": place.san.name, "size_bytes": size, "volume": handle}


@workflow("resize-volume")
def resize_volume(ctx: JobContext) -> dict[str, Any]:
    """Grow a volume any time, shrink one only while its VM is stopped (filesystem first, then the volume)."""
    new_size = ctx.params.size_bytes
    with ctx.session() as session:
        volume = session.get(Volume, ctx.params.volume_id)
        if volume is None:
            raise NotFound(f"no volume {ctx.params.volume_id}")
        vm = session.get(VirtualMachine, volume.vm_id) if volume.vm_id else None
        place = san_place(ctx.rt.config, session.get(San, volume.san_id).name)
    running = vm is not None and vm.state == "running"
    old_size = place.backend.size(volume.backend_handle)
    if new_size < old_size:
        if vm is not None and vm.state not in SHRINKABLE_STATES:
            raise VmNotStopped(f"{volume.name} belongs to VM {vm.name}, which is {vm.state}: shut it down to shrink",
                               vm=vm.name, state=vm.state)
        ctx.phase("check and shrink filesystem", progress=20)
        safe_shrink(place.backend, volume.backend_handle, new_size)
    elif new_size > old_size:
        ctx.phase("grow", progress=20)
        place.backend.resize(volume.backend_handle, new_size)
    note = _refresh_lun(place, volume, running)
    with ctx.session() as session:
        session.get(Volume, volume.id).size_bytes = new_size
    return {"old_size_bytes": old_size, "size_bytes": new_size, "note": note}


def _refresh_lun(place: SanPlace, volume: Volume, vm_running: bool) -> str:
    """tgt fixes a LUN's size when it is created: re-create it so initiators see the new size."""
    if volume.iscsi_target is None:
        return "not exported"
    if vm_running:
        return ("tgt cannot resize a LUN in use: the VM sees the new size after its next stop and start "
                "(the LUN is re-created when the VM starts)")
    tgt = target_for(place.san)
    tgt.unexport_lun(volume.iscsi_target, volume.iscsi_lun)
    tgt.export_lun(volume.iscsi_target, volume.iscsi_lun, place.backend.path_for_export(volume.backend_handle))
    return "LUN re-created with the new size"


@workflow("refresh-luns")
def refresh_luns(ctx: JobContext) -> dict[str, Any]:
    """Re-create a stopped VM's LUNs so a grown volume shows its new size at the next start."""
    with ctx.session() as session:
        volumes = session.scalars(select(Volume).join(VirtualMachine).where(VirtualMachine.name == ctx.params.vm)).all()
        san_names = {v.id: session.get(San, v.san_id).name for v in volumes}
    for volume in volumes:
        _refresh_lun(san_place(ctx.rt.config, san_names[volume.id]), volume, vm_running=False)
    return {"luns": len(volumes)}


@app.task(name="laxcluster.restore_exports")
def restore_exports(san_name: str) -> list[str]:
    """Make the SAN's tgtd export what the inventory says (after a tgtd or SAN restart); return the changes."""
    rt = runtime.current()
    place = san_place(rt.config, san_name)
    with rt.sessions() as session:
        volumes = session.execute(select(Volume, VirtualMachine.state).join(San).outerjoin(VirtualMachine)
                                  .where(San.name == san_name, Volume.iscsi_target.is_not(None))).all()
        initiators = site_initiators(session, place.site)
        stale = stale_targets(session, rt.config, place)
    luns: dict[str, dict[int, str]] = {}
    for volume, _ in volumes:
        luns.setdefault(volume.iscsi_target, {})[volume.iscsi_lun] = place.backend.path_for_export(volume.backend_handle)
    # A VM running on the SAN host keeps its targets locked.
    locked = {volume.iscsi_target for volume, state in volumes if state == MAINTENANCE}
    exports = [Export(iqn, by_lun, () if iqn in locked else initiators) for iqn, by_lun in luns.items()]
    tgt = target_for(place.san)
    changes = tgt.reconcile(exports)
    for iqn in stale:
        if tgt.find(iqn) is not None:
            tgt.unexport(iqn, force=True)
            changes.append(f"{iqn}: revoked (the VM is primary at another site)")
    return changes


def stale_targets(session: Session, config: Config, place: SanPlace) -> list[str]:
    """This site's target names of replicated VMs that are primary at another site (failed over while this SAN was
    away): a SAN coming back revokes them rather than serve a stale copy."""
    site_id = session.scalar(select(Site.id).where(Site.name == place.site.name))
    stale = []
    for vm in session.scalars(select(VirtualMachine).join(Replication, Replication.vm_id == VirtualMachine.id)):
        primary = primary_san(session, vm)
        if primary is not None and primary.site_id != site_id:
            stale.append(vm_target_iqn(config, place.site.name, vm))
    return stale


@worker_ready.connect
def restore_exports_when_a_worker_starts(sender, **_: object) -> None:
    """tgtd keeps no state across restarts: whichever worker starts asks each SAN to re-create its exports."""
    for site, san in runtime.current().config.sans():
        app.send_task("laxcluster.restore_exports", args=[san.name], queue=san_queue(site.name), expires=300)


@workflow("refresh-san")
def refresh_san(ctx: JobContext) -> dict[str, Any]:
    """Read the SAN's backend facts (size, free, reflink) and store them on its row."""
    place = san_place(ctx.rt.config, ctx.params.san)
    facts = place.backend.facts()
    with ctx.session() as session:
        session.scalar(select(San).where(San.name == place.san.name)).facts = facts
    return facts


@workflow("export-vm-disks")
def export_vm_disks(ctx: JobContext) -> dict[str, Any]:
    """Add an initiator to the ACL of the VM's target (its LUNs are already exported at install)."""
    san = san_place(ctx.rt.config, ctx.params.san)
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        refuse_if_not_primary(session, vm, session.scalar(select(Site.id).where(Site.name == san.site.name)))
        iqn = vm_target_iqn(ctx.rt.config, san.site.name, vm)
    tgt = target_for(san.san)
    target = tgt.find(iqn)
    if target is None:
        raise TargetNotFound(f"the SAN exports no target {iqn} for {ctx.params.vm}: start the VM once to re-export it",
                             iqn=iqn)
    wanted = ctx.params.initiator
    if wanted not in target.initiators:
        tgt.bind_initiators(iqn, [*target.initiators, wanted])
    return {"target": iqn, "initiators": sorted({*target.initiators, wanted}), "bound": wanted not in target.initiators}
