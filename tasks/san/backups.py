"""Backup jobs, run on the `san.<site>` queue: snapshot-backup, verify-backup and restore.

A backup of a VM is one Backup row (and one manifest in its store) per disk volume, all read
from snapshots taken together, so the VM keeps running and the disks agree with each other.
The newest backup's snapshot of a volume in a store stays on the SAN as the change-tracking
anchor: the next differential reads only what changed since it, even after the VM was stopped,
restarted or migrated. Older anchors are dropped once a newer backup is recorded.

Names are derived from the job id (snapshot `bk-<job>`, backup ids uuid5(job, volume)), so a
re-run after a crash and the cleanup of a failed or cancelled job find what the job made.
"""

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Config
from errors import BackupCancelled, BackupCorrupt, BackupNotFound, ManifestNotFound, NoDisks, NoStoreChosen, NotFound, StoreBusy, StoreNotFound, UnknownStoreKind, VmBeingDeleted, VmNotStopped, VolumeExists
from models import San, VirtualMachine, Volume, utcnow
from models.protection import Backup, BackupStore
from tasks import jobs
from tasks.context import JobContext
from tasks.dispatch import cancel_key
from tasks.inventory.vms import DATA_ROLE
from tasks.kinds import prune_lock
from tasks.san.storage import handle_in_use, target_for
from tasks.san.volumes import SanPlace, san_place
from tasks.workflow import workflow
from workers.san.backend import VolumeBackend, snapshot_handle
from workers.san.backup import backup_volume, check_chunks_stored, restore_volume, verify_backup
from workers.san.chunks import ChunkStore, LocalStore
from workers.san.ssh_store import SshStore

STORE_KINDS = ("local", "ssh")
# A VM's boot disk and its data disks: backed up together, from snapshots taken in one phase.
DISK_ROLES = ("disk", DATA_ROLE)
MODES = ("full", "diff")
# States of a backup whose manifest is published and whose snapshot may anchor a differential.
USABLE = ("complete", "verified")
STOPPED_STATES = ("shut off", "shutoff", "crashed", "defined", "stopped")
ERROR_LIMIT = 2047
PRUNE_WAIT_S = 600


@dataclass(frozen=True)
class StoreRef:
    """A store row, detached from its session."""

    id: int
    name: str
    kind: str
    location: str
    credentials: dict[str, Any]


@dataclass(frozen=True)
class Disk:
    volume_id: int
    name: str
    handle: str
    san: str


def open_store(store: StoreRef) -> ChunkStore:
    """The chunk store a store row describes (close it after use): `local` is a directory on the SAN host
    running the job, `ssh` one on another host (credentials: private_key, host_key, port)."""
    if store.kind == "local":
        return LocalStore(store.location)
    if store.kind == "ssh":
        return SshStore.from_row(store.location, store.credentials)
    raise UnknownStoreKind(f"store {store.name} has unknown kind {store.kind!r}", store=store.name)


def store_ref(session: Session, name: str | None, default: str | None = None) -> StoreRef:
    """The store named `name`; when no name is given, the `default` store if it exists, else the only
    store there is."""
    if name is None:
        row = session.scalar(select(BackupStore).where(BackupStore.name == default)) if default else None
        rows = [row] if row is not None else session.scalars(select(BackupStore).limit(2)).all()
        if len(rows) != 1:
            raise NoStoreChosen("name a backup store: there is not exactly one, and no default store "
                                "(backups.default_store) among them", stores=len(rows))
        row = rows[0]
    else:
        row = session.scalar(select(BackupStore).where(BackupStore.name == name))
        if row is None:
            raise StoreNotFound(f"no backup store {name}", store=name)
    return StoreRef(row.id, row.name, row.kind, row.location, dict(row.credentials or {}))


def default_store(config: Config) -> str | None:
    """The configured store for backups that name none (backups.default_store; empty: none)."""
    return config.section("backups").get("default_store") or None


def anchor_name(job_id: str) -> str:
    return f"bk-{job_id.replace('-', '')[:16]}"


def backup_id_for(job_id: str, volume: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"laxcluster:{job_id}/{volume}"))


def cancel_requested(ctx: JobContext) -> bool:
    return bool(ctx.rt.redis.exists(cancel_key(ctx.job_id)))


def vm_disks(session: Session, vm_name: str) -> tuple[VirtualMachine, list[Disk]]:
    vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == vm_name))
    if vm is None:
        raise NotFound(f"no VM {vm_name}", vm=vm_name)
    rows = session.execute(select(Volume, San.name).join(San, Volume.san_id == San.id)
                           .where(Volume.vm_id == vm.id, Volume.role.in_(DISK_ROLES)).order_by(Volume.name)).all()
    return vm, [Disk(volume.id, volume.name, volume.backend_handle, san) for volume, san in rows]


class ByteProgress:
    """Maps per-volume (done, total) onto the job's bytes and its percent between `start` and `end`."""

    def __init__(self, ctx: JobContext, start: float, end: float) -> None:
        self.ctx, self.start, self.end = ctx, start, end
        self.offset = 0

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        self.ctx.report.update(bytes_done=self.offset + done, bytes_total=self.offset + total,
                               progress=self.start + (self.end - self.start) * fraction)

    def next_volume(self, finished_total: int, start: float, end: float) -> None:
        self.offset += finished_total
        self.start, self.end = start, end


def stoppable(ctx: JobContext, work: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a workers.san.backup call with the job's cancel flag; its cancel becomes the job's."""
    try:
        return work(*args, should_stop=lambda: cancel_requested(ctx), **kwargs)
    except BackupCancelled:
        raise jobs.JobCancelled(ctx.job_id) from None


# -- snapshot-backup ------------------------------------------------------------------------------

def drop_job_snapshots(ctx: JobContext) -> None:
    """Undo a failed or cancelled backup: its snapshots and manifests, unless a recorded backup uses them."""
    with ctx.session() as session:
        _, disks = vm_disks(session, ctx.params.vm)
        recorded = set(session.scalars(select(Backup.id).where(
            Backup.id.in_([backup_id_for(ctx.job_id, d.name) for d in disks]))))
        store = store_ref(session, ctx.params.store, default_store(ctx.rt.config))
    with open_store(store) as chunk_store:
        for disk in disks:
            backup_id = backup_id_for(ctx.job_id, disk.name)
            if backup_id in recorded:
                continue
            chunk_store.delete_manifest(backup_id)
            snap = snapshot_handle(disk.handle, anchor_name(ctx.job_id))
            san_place(ctx.rt.config, disk.san).backend.delete_snapshot(snap)


@workflow("snapshot-backup", cleanup=drop_job_snapshots)
def snapshot_backup(ctx: JobContext) -> dict[str, Any]:
    """Snapshot every disk of the VM together, back each one up (full, or only what changed since its
    anchor), record the backups, keep the new snapshots as anchors and drop the older ones."""
    mode = ctx.params.mode
    with ctx.session() as session:
        vm, disks = vm_disks(session, ctx.params.vm)
        store = store_ref(session, ctx.params.store, default_store(ctx.rt.config))
        vm_id = vm.id
        if vm.desired_state == "deleted":
            raise VmBeingDeleted(f"VM {vm.name} is being deleted", vm=vm.name)
    if not disks:
        raise NoDisks(f"VM {ctx.params.vm} has no disk volumes", vm=ctx.params.vm)
    wait_while_pruned(ctx, store)
    ctx.phase("snapshot", progress=2)
    snaps = {disk.name: take_snapshot(san_place(ctx.rt.config, disk.san).backend, disk.handle, anchor_name(ctx.job_id))
             for disk in disks}
    manifests = back_up_disks(ctx, disks, snaps, store, mode)
    ctx.phase("record", progress=96)
    with ctx.session() as session:
        rows = [record_backup(session, vm_id, ctx.params.vm, disk, store, manifest | {"group": ctx.job_id})
                for disk, manifest in zip(disks, manifests)]
    ctx.report.update(phase="drop older anchors", progress=98)
    for disk in disks:
        drop_older_anchors(ctx, disk)
    return {"vm": ctx.params.vm, "store": store.name, "backups": rows}


def back_up_disks(ctx: JobContext, disks: list[Disk], snaps: dict[str, str], store: StoreRef,
                  mode: str) -> list[dict[str, Any]]:
    """Back up each disk's snapshot in turn into the store; return their manifests."""
    progress = ByteProgress(ctx, 5, 5)
    span = 90 / len(disks)
    manifests: list[dict[str, Any]] = []
    with open_store(store) as chunk_store:
        for number, disk in enumerate(disks):
            progress.next_volume(manifests[-1]["bytes_read"] if manifests else 0, 5 + number * span,
                                 5 + (number + 1) * span)
            ctx.phase(f"read {disk.name}", progress=progress.start)
            manifests.append(back_up_disk(ctx, disk, snaps[disk.name], store, chunk_store, mode, progress))
    return manifests


def wait_while_pruned(ctx: JobContext, store: StoreRef) -> None:
    """Wait (without a worker) until no prune of the store runs. With the prune's own check for
    unfinished backups this keeps garbage collection from deleting a chunk a running backup reuses:
    this job's row exists before its check, and the prune's lock before the prune's check."""
    with ctx.session() as session:
        holder = jobs.holder_of(session, prune_lock(store.name))
    if holder is None:
        return
    ctx.report.update(phase=f"wait for prune job {holder}")
    if not ctx.wait_for_other_job(holder, PRUNE_WAIT_S):
        raise StoreBusy(f"store {store.name} is being pruned by job {holder}", job_id=holder, store=store.name)


def take_snapshot(backend: VolumeBackend, handle: str, name: str) -> str:
    """Snapshot volume `handle` now; a snapshot of the same name from an earlier, crashed attempt is replaced."""
    try:
        return backend.snapshot(handle, name)
    except VolumeExists:
        backend.delete_snapshot(snapshot_handle(handle, name))
        return backend.snapshot(handle, name)


def usable_anchor(session: Session, disk: Disk, store: StoreRef, backend: VolumeBackend) -> Backup | None:
    """The newest usable backup of the volume in this store whose snapshot is still on the SAN."""
    candidates = session.scalars(select(Backup).where(
        Backup.volume_name == disk.name, Backup.san_name == disk.san, Backup.store_id == store.id,
        Backup.state.in_(USABLE), Backup.snapshot.is_not(None)).order_by(Backup.created_at.desc()).limit(1)).all()
    return next((b for b in candidates if backend.exists(b.snapshot)), None)


def back_up_disk(ctx: JobContext, disk: Disk, snap: str, store: StoreRef, chunk_store: ChunkStore, mode: str,
                 progress: ByteProgress) -> dict[str, Any]:
    """Back up one snapshot: a differential against the volume's anchor when asked and one exists, else full."""
    backend = san_place(ctx.rt.config, disk.san).backend
    parent_id = parent_snap = None
    if mode == "diff":
        with ctx.session() as session:
            anchor = usable_anchor(session, disk, store, backend)
            if anchor is not None:
                parent_id, parent_snap = anchor.id, anchor.snapshot
    parent = ranges = None
    if parent_id is not None:
        try:
            parent = chunk_store.get_manifest(parent_id)
            ranges = backend.changed_ranges(parent_snap, snap)
        except ManifestNotFound:
            parent = None
    return stoppable(ctx, backup_volume, backend.path_for_export(snap), backend.size(snap), chunk_store,
                     backup_id=backup_id_for(ctx.job_id, disk.name), parent_manifest=parent, ranges=ranges,
                     snapshot=snap, on_progress=progress)


def record_backup(session: Session, vm_id: int, vm_name: str, disk: Disk, store: StoreRef,
                  manifest: dict[str, Any]) -> dict[str, Any]:
    row = session.get(Backup, manifest["id"])
    if row is None:
        row = Backup(id=manifest["id"])
        session.add(row)
    row.vm_id, row.vm_name, row.volume_id, row.volume_name, row.san_name = vm_id, vm_name, disk.volume_id, disk.name, disk.san
    row.store_id, row.mode, row.parent_id, row.snapshot = store.id, manifest["mode"], manifest["parent"], manifest["snapshot"]
    row.group_id = manifest.get("group")
    row.state, row.chunks, row.size_bytes = "complete", len(manifest["chunks"]), manifest["volume_size"]
    row.stored_bytes, row.bytes_read = manifest["bytes_written"], manifest["bytes_read"]
    return {"id": row.id, "volume": disk.name, "volume_id": disk.volume_id, "mode": row.mode, "parent": row.parent_id, "size_bytes": row.size_bytes,
            "bytes_read": row.bytes_read, "stored_bytes": row.stored_bytes, "seconds": manifest["seconds"]}


def drop_older_anchors(ctx: JobContext, disk: Disk) -> None:
    """Delete the volume's backup snapshots except the newest one per store (the anchors)."""
    with ctx.session() as session:
        rows = session.execute(select(Backup.store_id, Backup.snapshot).where(
            Backup.volume_name == disk.name, Backup.san_name == disk.san, Backup.snapshot.is_not(None))
            .order_by(Backup.created_at.desc())).all()
    newest: dict[int, str] = {}
    for store_id, snap in rows:
        newest.setdefault(store_id, snap)
    backend = san_place(ctx.rt.config, disk.san).backend
    for snap in {snap for _, snap in rows} - set(newest.values()):
        backend.delete_snapshot(snap)


# -- verify-backup --------------------------------------------------------------------------------

def load_backup(session: Session, backup_id: str) -> tuple[Backup, StoreRef]:
    backup = session.get(Backup, backup_id)
    if backup is None:
        raise BackupNotFound(f"no backup {backup_id}", backup=backup_id)
    store = session.get(BackupStore, backup.store_id)
    return backup, StoreRef(store.id, store.name, store.kind, store.location, dict(store.credentials or {}))


@workflow("verify-backup")
def verify_backup_job(ctx: JobContext) -> dict[str, Any]:
    """Re-read and re-hash every chunk of a backup; mark it verified, or corrupt naming the bad chunks."""
    backup_id = ctx.params.backup
    with ctx.session() as session:
        _, store = load_backup(session, backup_id)
    ctx.phase("read manifest", progress=2)
    with open_store(store) as chunk_store:
        try:
            manifest = chunk_store.get_manifest(backup_id)
        except ManifestNotFound as missing:
            problems = [missing.message]
        else:
            ctx.phase("verify chunks", progress=5)
            problems = stoppable(ctx, verify_backup, chunk_store, manifest, on_progress=ByteProgress(ctx, 5, 98))
    with ctx.session() as session:
        backup = session.get(Backup, backup_id)
        backup.state = "corrupt" if problems else "verified"
        backup.error = "; ".join(problems)[:ERROR_LIMIT] if problems else None
        if not problems:
            backup.verified_at = utcnow()
    if problems:
        raise BackupCorrupt(f"backup {backup_id} is corrupt: {'; '.join(problems[:3])}", backup=backup_id,
                            problems=problems[:50])
    return {"backup": backup_id, "ok": True, "chunks": len(manifest["chunks"])}


# -- restore --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InPlace:
    """The disk an in-place restore replaces: its volume row, the handle it had when the job began, and
    the volume beside it that the backup is written to (both chosen once per job)."""

    backup_id: str
    volume_id: int
    san_id: int
    original: str
    beside: str
    swapped: bool


def restore_target_name(ctx: JobContext, backup: Backup) -> str:
    return ctx.params.as_volume or f"{backup.volume_name}-r{backup.id.replace('-', '')[:8]}"


def new_volume_handle() -> str:
    """A backend name nobody chooses, so it can never be another volume's."""
    return f"vol-{uuid.uuid4().hex}"


def undo_restore(ctx: JobContext) -> None:
    """Delete the volume an unfinished restore wrote to: the new `restoring` volume, or, in place, the volume
    beside the disk unless the disk row already stands on it. The VM's original disk is never written."""
    with ctx.session() as session:
        backup, _ = load_backup(session, ctx.params.backup)
        san = session.scalar(select(San).where(San.name == backup.san_name))
        backend = san_place(ctx.rt.config, backup.san_name).backend
        if ctx.params.in_place:
            for member in group_of(session, backup):
                beside = ctx.remembered(f"restore-into/{member.id}")
                if beside is not None and not handle_in_use(session, san.id, beside):
                    backend.delete(beside)
            return
        name = restore_target_name(ctx, backup)
        volume = session.scalar(select(Volume).where(Volume.san_id == san.id, Volume.name == name,
                                                     Volume.role == "restoring"))
        if volume is None:
            return
        backend.delete(name)
        session.delete(volume)


@workflow("restore", cleanup=undo_restore)
def restore_job(ctx: JobContext) -> dict[str, Any]:
    """Restore a backup bit for bit: to a new volume on the backup's SAN, or in place onto its stopped VM's disks.

    Nothing is written before the store is seen to hold every chunk the backup needs. In place, every disk
    backed up together with this one (the backup's group) is restored: each backup is written to a new volume
    beside its disk, and the new volumes replace the disks together, only once all are whole: a missing
    chunk, a failure or a cancel before that leaves every disk as it was."""
    with ctx.session() as session:
        backup, store = load_backup(session, ctx.params.backup)
        backup_id, volume_name, san_name, vm_name = backup.id, backup.volume_name, backup.san_name, backup.vm_name
        disks = [in_place_plan(ctx, member, in_place_disk(session, member)) for member in group_of(session, backup)] \
            if ctx.params.in_place else []
        target = None if disks else claim_new_volume(ctx, session, backup)
    place = san_place(ctx.rt.config, san_name)
    if disks:
        written = restore_in_place(ctx, place, store, disks)
    else:
        written = write_backup(ctx, store, backup_id, place.backend, target)
        with ctx.session() as session:
            san_id = session.scalar(select(San.id).where(San.name == san_name))
            volume = session.scalar(select(Volume).where(Volume.san_id == san_id, Volume.name == target))
            volume.size_bytes, volume.role = written["volume_size"], "disk"
    return {"backup": backup_id, "volume": volume_name if disks else target, "san": san_name,
            "in_place": ctx.params.in_place, "vm": vm_name if disks else None, "source_volume": volume_name,
            **written}


def restore_in_place(ctx: JobContext, place: SanPlace, store: StoreRef, disks: list[InPlace]) -> dict[str, Any]:
    """Write each backup beside its disk, swap them all in at once, drop the replaced volumes. A run after a
    crash past the swap only finishes the last step."""
    written: dict[str, dict[str, Any]] = {}
    if not any(disk.swapped for disk in disks):
        for disk in disks:
            written[disk.backup_id] = write_backup(ctx, store, disk.backup_id, place.backend, disk.beside)
        ctx.phase("replace the disks", progress=98)
        swap_in(ctx, disks, {backup: done["volume_size"] for backup, done in written.items()})
    with ctx.session() as session:
        for disk in disks:
            if not handle_in_use(session, disk.san_id, disk.original):
                place.backend.delete(disk.original)
            serve_restored(place, session.get(Volume, disk.volume_id))
    first = written.get(disks[0].backup_id, {})
    return first | {"disks": [{"backup": d.backup_id, "volume_id": d.volume_id} for d in disks]}


def write_backup(ctx: JobContext, store: StoreRef, backup_id: str, backend: VolumeBackend,
                 target: str) -> dict[str, Any]:
    """Check that the store holds every chunk of the backup, then write the backup into volume `target`."""
    ctx.phase("read manifest", progress=2)
    with open_store(store) as chunk_store:
        manifest = chunk_store.get_manifest(backup_id)
        ctx.phase("check chunks", progress=3)
        stoppable(ctx, check_chunks_stored, chunk_store, manifest)
        ensure_volume(backend, target, manifest["volume_size"])
        ctx.phase("write", progress=5)
        return stoppable(ctx, restore_volume, chunk_store, manifest, backend.path_for_export(target),
                         on_progress=ByteProgress(ctx, 5, 97))


def in_place_disk(session: Session, backup: Backup) -> Volume:
    """The disk an in-place restore replaces: the backed-up volume (by id) of the VM it was taken from (by id,
    so never a later VM of the same name), which must not be running."""
    vm = session.get(VirtualMachine, backup.vm_id) if backup.vm_id is not None else None
    if vm is None:
        raise NotFound(f"VM {backup.vm_name} no longer exists: restore to a new volume", vm=backup.vm_name)
    if vm.state not in STOPPED_STATES:
        raise VmNotStopped(f"VM {vm.name} is {vm.state}: shut it down before an in-place restore", vm=vm.name)
    volume = session.get(Volume, backup.volume_id) if backup.volume_id is not None else None
    if volume is None or volume.vm_id != vm.id:
        raise NotFound(f"VM {vm.name} has no volume {backup.volume_name}", volume=backup.volume_name)
    return volume


def group_of(session: Session, backup: Backup) -> list[Backup]:
    """The backups taken together with `backup` (one job, one VM's disks), in volume order; alone if it has no group."""
    if backup.group_id is None:
        return [backup]
    return list(session.scalars(select(Backup).where(Backup.group_id == backup.group_id).order_by(Backup.volume_name)))


def in_place_plan(ctx: JobContext, backup: Backup, disk: Volume) -> InPlace:
    """The disk's handle when the job began and the new volume beside it, both remembered across runs."""
    original = ctx.once(f"replaces/{backup.id}", lambda: disk.backend_handle)
    beside = ctx.once(f"restore-into/{backup.id}", new_volume_handle)
    return InPlace(backup.id, disk.id, disk.san_id, original, beside, swapped=disk.backend_handle == beside)


def swap_in(ctx: JobContext, disks: list[InPlace], sizes: dict[str, int]) -> None:
    """The point of no return: in one transaction every disk's row takes its restored volume, while the VM is
    still stopped. A cancel from here on is too late: the job finishes."""
    with ctx.session() as session:
        for disk in disks:
            volume = session.get(Volume, disk.volume_id)
            vm = session.get(VirtualMachine, volume.vm_id)
            if vm.state not in STOPPED_STATES:
                raise VmNotStopped(f"VM {vm.name} is {vm.state}: it was started during the restore", vm=vm.name)
            volume.backend_handle, volume.size_bytes = disk.beside, sizes[disk.backup_id]


def serve_restored(place: SanPlace, volume: Volume) -> None:
    """tgt holds the replaced file open: point the disk's LUN at the restored volume (no initiator uses it while
    the VM is stopped). A target tgtd no longer has is re-created, with its ACL, when the VM starts."""
    tgt = target_for(place.san)
    if volume.iscsi_target is not None and tgt.find(volume.iscsi_target) is not None:
        tgt.export_lun(volume.iscsi_target, volume.iscsi_lun, place.backend.path_for_export(volume.backend_handle))


def claim_new_volume(ctx: JobContext, session: Session, backup: Backup) -> str:
    """Register the new volume as `restoring` (the cleanup deletes only such a volume); refuse a name in use."""
    name = restore_target_name(ctx, backup)
    san = session.scalar(select(San).where(San.name == backup.san_name))
    existing = session.scalar(select(Volume).where(Volume.san_id == san.id, Volume.name == name))
    if existing is not None and existing.role != "restoring":
        raise VolumeExists(f"volume {name} already exists on {san.name}", volume=name)
    if existing is None:
        if san_place(ctx.rt.config, san.name).backend.exists(name):
            raise VolumeExists(f"volume {name} already exists on {san.name}", volume=name)
        session.add(Volume(san_id=san.id, name=name, role="restoring", size_bytes=backup.size_bytes,
                           backend_handle=name))
    return name


def ensure_volume(backend: VolumeBackend, handle: str, size: int) -> None:
    """Make `handle` exist with exactly `size` bytes (its content is overwritten next)."""
    if not backend.exists(handle):
        backend.create(handle, size)
    elif backend.size(handle) != size:
        backend.resize(handle, size, contents_fit=True)
