"""Data disk workflows on the control queue: add a disk to a VM (a volume on its SAN, another LUN of its target,
hot-plugged into a running domain or added to its definition for the next start) and remove one.

Disks are found by volume id; the new volume's name and LUN are chosen once per job, so a re-run after a crash
converges and the undo of a failed or cancelled add removes exactly the disk it made.
"""

import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from errors import BootDiskNotRemovable, DiskNotFound, TooManyDisks, VmBeingDeleted
from models import San, VirtualMachine, Volume
from tasks.context import JobContext
from tasks.control.vms import SAN_TIMEOUT_S
from tasks.inventory.vms import DATA_ROLE, MAINTENANCE, find_vm, placed_on, refuse_while_away, vm_volume
from tasks.kinds import san_of_vm
from tasks.san.volumes import SEED_LUN
from tasks.workflow import workflow

NODE_TIMEOUT_S = 120  # one attach or detach (the guest gets workers.node.domains.DETACH_TIMEOUT_S to let go)
MAX_DATA_DISKS = 16


def data_disks(session: Session, vm: VirtualMachine) -> list[Volume]:
    return list(session.scalars(select(Volume).where(Volume.vm_id == vm.id, Volume.role == DATA_ROLE)
                                .order_by(Volume.iscsi_lun)))


def check_room(session: Session, vm: VirtualMachine) -> None:
    """Refuse a new data disk for a VM being deleted (VmBeingDeleted), one on its SAN host (VmInMaintenance: its
    exports are locked), or one that has the most it may have (TooManyDisks)."""
    if vm.state == MAINTENANCE:
        refuse_while_away(vm)
    if vm.desired_state == "deleted":
        raise VmBeingDeleted(f"VM {vm.name} is being deleted", vm=vm.name)
    if len(data_disks(session, vm)) >= MAX_DATA_DISKS:
        raise TooManyDisks(f"VM {vm.name} has {MAX_DATA_DISKS} data disks, the most it may have", vm=vm.name,
                           limit=MAX_DATA_DISKS)


def next_lun(session: Session, vm: VirtualMachine) -> int:
    """The LUN after the VM's highest one; data disks come after the boot disk (1) and the seed (2)."""
    check_room(session, vm)
    highest = session.scalar(select(func.max(Volume.iscsi_lun)).where(Volume.vm_id == vm.id))
    return max(highest or 0, SEED_LUN) + 1


def where_attached(session: Session, vm: VirtualMachine) -> str | None:
    """The server whose domain of the VM takes a disk change now, or None (not placed: its next start will)."""
    return placed_on(session, vm) if vm.server_id is not None and vm.state != "undefined" else None


def chosen_disk(ctx: JobContext) -> tuple[str, int, str]:
    """The new disk's volume name and LUN (chosen once per job) and the VM's SAN."""
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        name = ctx.once("volume", lambda: vm_volume(vm, f"data-{uuid.uuid4().hex[:12]}"))
        lun = ctx.once("lun", lambda: next_lun(session, vm))
        return name, lun, san_of_vm(session, ctx.params)


def undo_add_disk(ctx: JobContext) -> None:
    """Unplug and delete the disk this job made, if it got as far as choosing one."""
    name = ctx.remembered("volume")
    if name is None:
        return
    with ctx.session() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == ctx.params.vm))
        if vm is None:
            return
        san = san_of_vm(session, ctx.params)
        volume_id = session.scalar(select(Volume.id).join(San).where(San.name == san, Volume.name == name))
    ctx.report.update(phase="remove the new disk")
    remove_disk_everywhere(ctx, volume_id, name, san, cancellable=False)


@workflow("add-disk", cleanup=undo_add_disk)
def add_disk(ctx: JobContext) -> dict[str, Any]:
    """Make a volume on the VM's SAN, export it as the next LUN of its target and attach it to the VM: hot-plugged
    if it runs, else in its definition; a VM without a domain gets it when it next starts."""
    ctx.phase("choose", progress=2)
    name, lun, san = chosen_disk(ctx)
    ctx.phase("create volume", progress=5)
    made = ctx.run_child("create-data-disk", {"vm": ctx.params.vm, "san": san, "volume": name, "lun": lun,
                                              "size_bytes": ctx.params.size_bytes, "label": ctx.params.label},
                         timeout=SAN_TIMEOUT_S, start=5, end=60)
    ctx.phase("attach", progress=60)
    with ctx.session() as session:
        server = where_attached(session, find_vm(session, ctx.params.vm))
    attached = "at next start"
    if server is not None:
        result = ctx.run_child("attach-disk", {"vm": ctx.params.vm, "server": server, "volume_id": made["volume_id"]},
                               timeout=NODE_TIMEOUT_S, start=60, end=98)
        attached = "hot-plugged" if result["attached"] == "live" else "at next start"
        ctx.report.update(phase=f"attached {attached} as {result['device']}")
    return {"vm": ctx.params.vm, "disk": made["volume_id"], "volume": name, "lun": lun, "label": ctx.params.label,
            "size_bytes": ctx.params.size_bytes, "attached": attached}


@workflow("remove-disk")
def remove_disk(ctx: JobContext) -> dict[str, Any]:
    """Detach a data disk from the VM (live if it runs), remove its LUN and delete its volume."""
    # Found once: a run resumed after a child ended finds the row gone once the disk is deleted.
    name, san = ctx.once("disk", lambda: disk_to_remove(ctx))
    ctx.phase("detach", progress=5)
    remove_disk_everywhere(ctx, ctx.params.volume_id, name, san, cancellable=True)
    return {"vm": ctx.params.vm, "disk": ctx.params.volume_id, "deleted": name}


def disk_to_remove(ctx: JobContext) -> list[str]:
    """The volume name and SAN of the job's data disk (refused unless it is one of the VM's data disks)."""
    with ctx.session() as session:
        volume = data_disk_of(session, find_vm(session, ctx.params.vm), ctx.params.volume_id)
        return [volume.name, session.get(San, volume.san_id).name]


def data_disk_of(session: Session, vm: VirtualMachine, volume_id: int) -> Volume:
    """The VM's data disk `volume_id`; the boot disk and the seed are refused (they go with the VM)."""
    volume = session.get(Volume, volume_id)
    if volume is None or volume.vm_id != vm.id:
        raise DiskNotFound(f"VM {vm.name} has no disk {volume_id}", vm=vm.name, disk=volume_id)
    if volume.role != DATA_ROLE:
        raise BootDiskNotRemovable(f"disk {volume_id} is {vm.name}'s {volume.role} volume: it goes only with the VM "
                                   "(delete the VM)", vm=vm.name, disk=volume_id)
    return volume


def remove_disk_everywhere(ctx: JobContext, volume_id: int | None, name: str, san: str, *, cancellable: bool) -> None:
    """Unplug the disk from the VM's domain (if it has one and the disk has a row), then unexport and delete it."""
    with ctx.session() as session:
        server = where_attached(session, find_vm(session, ctx.params.vm))
    if server is not None and volume_id is not None:
        ctx.run_child("detach-disk", {"vm": ctx.params.vm, "server": server, "volume_id": volume_id},
                      timeout=NODE_TIMEOUT_S, start=5, end=50, cancellable=cancellable)
    ctx.report.update(phase="delete volume", progress=50)
    ctx.run_child("remove-data-disk", {"vm": ctx.params.vm, "san": san, "volume": name}, timeout=SAN_TIMEOUT_S,
                  start=50, end=98, cancellable=cancellable)
