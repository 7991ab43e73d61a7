"""SAN-side work for a VM's data disks, run on the `san.<site>` queue: make one and export it as another LUN of
the VM's target, or unexport and delete it. The control workflow (tasks.control.disks) chooses the volume's
name (from the VM's UUID and a random part, never from the operator's label) and its LUN once per job, so both
steps are idempotent and the undo of a failed add finds exactly what it made."""

from typing import Any

from sqlalchemy import select

from models import San, Volume
from tasks.context import JobContext
from tasks.inventory.vms import DATA_ROLE, find_vm
from tasks.san.storage import handle_in_use, site_initiators, target_for
from tasks.san.volumes import (
    anchors_of,
    export_luns,
    forget_volumes,
    record_volume,
    refuse_if_owned_by_another,
    san_place,
    vm_target_iqn,
)
from tasks.workflow import workflow


@workflow("create-data-disk")
def create_data_disk(ctx: JobContext) -> dict[str, Any]:
    """Create the data disk's volume, export it as LUN `lun` of the VM's target and record it."""
    name, lun = ctx.params.volume, ctx.params.lun
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        san = session.scalar(select(San).where(San.name == ctx.params.san))
        refuse_if_owned_by_another(session, san.id, name, vm)
        place = san_place(ctx.rt.config, san.name)
        iqn = vm_target_iqn(ctx.rt.config, place.site.name, vm)
        initiators = site_initiators(session, place.site)
    ctx.phase("create volume", progress=10)
    if not place.backend.exists(name):
        place.backend.create(name, ctx.params.size_bytes)
    ctx.phase("export", progress=60)
    export_luns(place, iqn, {lun: name}, initiators)
    with ctx.session() as session:
        volume_id = record_volume(session, san.id, vm.id, name, DATA_ROLE, place.backend.size(name), iqn, lun,
                                  ctx.params.label).id
    return {"volume_id": volume_id, "volume": name, "target": iqn, "lun": lun}


@workflow("remove-data-disk")
def remove_data_disk(ctx: JobContext) -> dict[str, Any]:
    """Unexport the data disk's LUN, delete its backup anchors and its volume, and drop its row (whatever of
    them exists). The VM's domain must have let go of it first."""
    name = ctx.params.volume
    place = san_place(ctx.rt.config, ctx.params.san)
    with ctx.session() as session:
        san_id = session.scalar(select(San.id).where(San.name == place.san.name))
        row = session.scalar(select(Volume).where(Volume.san_id == san_id, Volume.name == name))
        anchors = anchors_of(session, [row.id]) if row is not None else []
        # An in-place restore may have put the disk on another backend volume than its name.
        handles = sorted({name} | ({row.backend_handle} if row is not None else set()))
        export = (row.iscsi_target, row.iscsi_lun) if row is not None and row.iscsi_target else None
    ctx.phase("unexport", progress=20)
    if export is not None:
        target_for(place.san).unexport_lun(*export)
    ctx.phase("delete volume", progress=50)
    for snap in anchors:
        place.backend.delete_snapshot(snap)
    with ctx.session() as session:
        forget_volumes(session, list(session.scalars(select(Volume).where(Volume.san_id == san_id, Volume.name == name))),
                       anchors)
        for handle in handles:
            if not handle_in_use(session, san_id, handle):
                place.backend.delete(handle)
    return {"deleted": handles, "anchors": anchors}
