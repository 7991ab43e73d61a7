"""DR replication jobs on the `san.<site>` queues: ship a VM's disks to the peer SAN, promote a replica.

`replicate-to-dr` runs on the primary's SAN: it snapshots every replicated disk of the VM together as the
next point (`rep-<seq>`), reads only what changed since the base point both sides hold, and streams it over
SSH to `workers.san.receive` on the peer SAN host, which applies it to a working copy and snapshots that as
the point only when every disk is complete. Then, and only then, the inventory records the point and makes
it the new base, and the source drops its older point snapshots. A ship that breaks leaves the base as it was;
the next one starts from it again.

`promote-replica` runs on the peer's SAN at a failover: each disk becomes a volume again from the chosen
point, exported to that site's servers, and the VM's volume rows move there (its generation goes up).
`retire-copy` runs on the old primary's SAN: its target for the VM goes, so no server there reaches the stale copy.
"""

import time
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Config, SanConfig, replication_address
from errors import ReplicaBaseMissing
from models import Cluster, San, VirtualMachine, Volume, utcnow
from models.protection import ReplicaDisk, ReplicaPoint, Replication
from tasks import jobs
from tasks.context import JobContext
from tasks.inventory.dr import (REPLICATED_ROLES, chosen_point, point_name, points, primary_san,
                                replica_disks, replication_of)
from tasks.inventory.vms import find_vm
from tasks.san.backups import take_snapshot
from tasks.san.storage import site_initiators, target_for
from tasks.san.volumes import SanPlace, export_luns, san_place, vm_target_iqn
from tasks.workflow import workflow
from workers.san.backend import VolumeBackend, snapshot_handle
from workers.san.peer import open_peer
from workers.san.replication import DiskDelta, ReplicationCancelled, ShipResult, ranges_to_ship, send

# -- replicate-to-dr ---------------------------------------------------------------------------------


def ship_plan(ctx: JobContext) -> dict[str, Any]:
    """What this ship does, fixed at its first run: the point's name and moment, the SANs, and each disk's base."""
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        rep = replication_of(session, vm)
        source = primary_san(session, vm)
        disks = sync_replica_disks(session, rep, vm)
        seq = rep.next_seq
        rep.next_seq, rep.last_attempt_at = seq + 1, utcnow()
        return {"point": point_name(seq), "taken_at": utcnow().isoformat(), "san": source.name,
                "peer": session.get(San, rep.peer_san_id).name, "limit": rep.bandwidth_limit_bytes_s,
                "keep": kept_points(session, rep),
                "disks": [{"volume_id": d.volume_id, "handle": session.get(Volume, d.volume_id).backend_handle,
                           "replica": d.replica, "base": d.base_point} for d in disks]}


def kept_points(session: Session, rep: Replication) -> list[str]:
    """The peer's points that stay besides the new one: the newest `keep - 1`, and always the base (should this
    ship fail after the peer committed, the next one starts from it again)."""
    kept = [p.name for p in points(session, rep)[:max(rep.keep - 1, 0)]]
    return kept + [rep.base_point] if rep.base_point and rep.base_point not in kept else kept


def sync_replica_disks(session: Session, rep: Replication, vm: VirtualMachine) -> list[ReplicaDisk]:
    """The VM's replicated disks, a row made for each volume added since (its first ship is a full one)."""
    known = {d.volume_id for d in replica_disks(session, rep)}
    for volume in session.scalars(select(Volume).where(Volume.vm_id == vm.id, Volume.role.in_(REPLICATED_ROLES))):
        if volume.id not in known:
            session.add(ReplicaDisk(replication_id=rep.id, volume_id=volume.id, replica=volume.backend_handle))
    session.flush()
    return replica_disks(session, rep)


def drop_ship_snapshots(ctx: JobContext) -> None:
    """A failed or cancelled ship: its point's snapshots on the source go (the base stays, the peer made no point)."""
    plan = ctx.remembered("plan")
    if plan is None:
        return
    backend = san_place(ctx.rt.config, plan["san"]).backend
    for disk in plan["disks"]:
        backend.delete_snapshot(snapshot_handle(disk["handle"], plan["point"]))


@workflow("replicate-to-dr", cleanup=drop_ship_snapshots)
def replicate_to_dr(ctx: JobContext) -> dict[str, Any]:
    """Snapshot the VM's disks as the next point, ship what changed since the base to the peer, record the point."""
    plan = ctx.once("plan", lambda: ship_plan(ctx))
    place = san_place(ctx.rt.config, plan["san"])
    ctx.phase("snapshot", progress=5)
    for disk in plan["disks"]:
        take_snapshot(place.backend, disk["handle"], plan["point"])
    ctx.phase("compare", progress=10)
    deltas = [delta(place.backend, disk, plan["point"]) for disk in plan["disks"]]
    ctx.phase("ship", progress=15)
    started = time.monotonic()
    try:
        result = ship(ctx, plan, deltas)
    except ReplicaBaseMissing:
        ctx.report.update(phase="ship (the peer lost the base: full)")
        result = ship(ctx, plan, [delta(place.backend, {**disk, "base": None}, plan["point"]) for disk in plan["disks"]])
    seconds = time.monotonic() - started
    ctx.phase("record", progress=95)
    record_point(ctx, plan, result, seconds)
    drop_older_points(place.backend, plan)
    return {"point": plan["point"], "peer": plan["peer"], "bytes_changed": result.bytes_changed,
            "bytes_sent": result.bytes_sent, "seconds": round(seconds, 3), "points": result.points,
            "full": [d.replica for d in deltas if d.base is None]}


def delta(backend: VolumeBackend, disk: dict[str, Any], point: str) -> DiskDelta:
    """What to ship of one disk: what changed since its base (when the source still has it), else everything."""
    source = snapshot_handle(disk["handle"], point)
    base = disk["base"] if disk["base"] and backend.exists(snapshot_handle(disk["handle"], disk["base"])) else None
    base_handle = snapshot_handle(disk["handle"], base) if base else None
    return DiskDelta(replica=disk["replica"], base=base, source=source, size=backend.size(source),
                     ranges=ranges_to_ship(backend, base_handle, source))


def ship(ctx: JobContext, plan: dict[str, Any], deltas: list[DiskDelta]) -> ShipResult:
    """Stream the deltas to the peer's receiver over SSH; the job's progress follows the bytes."""
    total = sum(length for d in deltas for _, length in d.ranges)
    with ctx.session() as session:
        replication_of(session, find_vm(session, ctx.params.vm)).bytes_behind = total

    def progress(done: int, whole: int) -> None:
        ctx.report.update(bytes_done=done, bytes_total=whole, progress=15 + 80 * (done / whole if whole else 1))

    channel = open_peer_receiver(ctx.rt.config, plan["peer"])
    try:
        return send(san_place(ctx.rt.config, plan["san"]).backend, deltas, plan["point"], plan["keep"], channel,
                    limit_bytes_s=plan["limit"], progress=progress, cancelled=ctx.cancel_asked)
    except ReplicationCancelled:
        raise jobs.JobCancelled(ctx.job_id) from None


def open_peer_receiver(config: Config, peer_name: str):
    """An SSH channel to `workers.san.receive` on the peer SAN host, set to the peer's backend."""
    _, peer = config.san(peer_name)
    rep = config.replication
    argv = [rep.remote_python, "-m", "workers.san.receive", *backend_args(peer)]
    return open_peer(replication_address(peer), rep.port, rep.user, rep.key_file, rep.known_hosts_file, argv)


def backend_args(san: SanConfig) -> list[str]:
    if san.backend == "lvm":
        return ["--backend", "lvm", "--volume-group", str(san.volume_group)]
    return ["--backend", san.backend, "--pool", str(san.pool_path.resolve())]


def record_point(ctx: JobContext, plan: dict[str, Any], result: ShipResult, seconds: float) -> None:
    """The point is on the peer: it becomes the base of every disk, and points the peer pruned are forgotten."""
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        rep = replication_of(session, vm)
        peer = session.scalar(select(San).where(San.name == plan["peer"]))
        session.add(ReplicaPoint(replication_id=rep.id, name=plan["point"], san_id=peer.id,
                                 taken_at=datetime.fromisoformat(plan["taken_at"]), bytes_changed=result.bytes_changed,
                                 bytes_sent=result.bytes_sent, seconds=seconds))
        for row in session.scalars(select(ReplicaPoint).where(ReplicaPoint.replication_id == rep.id,
                                                               ReplicaPoint.san_id == peer.id)):
            if row.name not in result.points and row.name != plan["point"]:
                session.delete(row)
        rep.base_point, rep.bytes_behind = plan["point"], 0
        for disk in replica_disks(session, rep):
            disk.base_point = plan["point"]


def drop_older_points(backend: VolumeBackend, plan: dict[str, Any]) -> None:
    """On the source only the new base stays: the older point snapshots of each disk go."""
    for disk in plan["disks"]:
        prefix = f"{disk['handle']}@rep-"
        for handle in backend.listing():
            if handle.startswith(prefix) and handle != snapshot_handle(disk["handle"], plan["point"]):
                backend.delete_snapshot(handle)


# -- promote-replica, retire-copy -----------------------------------------------------------------------

@workflow("promote-replica")
def promote_replica(ctx: JobContext) -> dict[str, Any]:
    """Make the chosen point the VM's disks on this SAN, export them to this site, move the VM here."""
    place = san_place(ctx.rt.config, ctx.params.san)
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        rep = replication_of(session, vm)
        point = chosen_point(session, rep, ctx.params.point)
        disks = [(d.replica, session.get(Volume, d.volume_id)) for d in replica_disks(session, rep)]
        luns = {volume.iscsi_lun: replica for replica, volume in disks}
        iqn = vm_target_iqn(ctx.rt.config, place.site.name, vm)
        initiators = site_initiators(session, place.site)
        name, taken_at = point.name, point.taken_at
    ctx.phase("volumes from the point", progress=20)
    for replica, _ in disks:
        place.backend.delete(replica)
        place.backend.clone(snapshot_handle(replica, name), replica)
    ctx.phase("export", progress=60)
    export_luns(place, iqn, luns, initiators)
    ctx.phase("record", progress=90)
    with ctx.session() as session:
        move_vm_here(session, place, find_vm(session, ctx.params.vm), iqn, name)
    return {"point": name, "taken_at": taken_at.isoformat() + "Z", "target": iqn, "san": place.san.name}


def move_vm_here(session: Session, place: SanPlace, vm: VirtualMachine, iqn: str, point: str) -> None:
    """The VM's volume rows now name this SAN's volumes; its cluster is this site's; its generation goes up; the
    replication's peer is the old primary (failback ships there), paused until then, based on the point."""
    san = session.scalar(select(San).where(San.name == place.san.name))
    rep = replication_of(session, vm)
    old_san_id = None
    for disk in replica_disks(session, rep):
        volume = session.get(Volume, disk.volume_id)
        old_san_id = volume.san_id
        volume.san_id, volume.iscsi_target, volume.backend_handle = san.id, iqn, disk.replica
        volume.size_bytes = place.backend.size(disk.replica)
        disk.base_point = point
    if old_san_id is not None and old_san_id != san.id:
        vm.generation += 1
        rep.peer_san_id = old_san_id
    vm.cluster_id = session.scalar(select(Cluster.id).where(Cluster.site_id == san.site_id).order_by(Cluster.id))
    vm.server_id, vm.state, vm.domain_id = None, "shut off", None
    rep.enabled, rep.base_point = False, point


@workflow("retire-copy")
def retire_copy(ctx: JobContext) -> dict[str, Any]:
    """This SAN's target for the VM goes (sessions dropped), so no server of this site reaches its stale copy; with
    `drop`, the stale volumes too (their point snapshots stay). Nothing is done while the VM is primary here (a
    late run after a failback)."""
    place = san_place(ctx.rt.config, ctx.params.san)
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        here = session.scalar(select(San).where(San.name == place.san.name))
        if primary_san(session, vm).site_id == here.site_id:
            return {"retired": None, "san": place.san.name, "why": "the VM is primary at this site"}
        iqn = vm_target_iqn(ctx.rt.config, place.site.name, vm)
        stale = [d.replica for d in replica_disks(session, replication_of(session, vm))]
    target_for(place.san).unexport(iqn, force=True)
    if ctx.params.drop:
        for replica in stale:
            place.backend.delete(replica)
    return {"retired": iqn, "san": place.san.name, "dropped": stale if ctx.params.drop else []}


# -- drop-replica-points ----------------------------------------------------------------------------------

@workflow("drop-replica-points")
def drop_replica_points(ctx: JobContext) -> dict[str, Any]:
    """Replication stops: the point snapshots of the VM's disks on this SAN go, and a replica volume no row owns."""
    place = san_place(ctx.rt.config, ctx.params.san)
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        replicas = [d.replica for d in replica_disks(session, replication_of(session, vm))]
        live = set(session.scalars(select(Volume.backend_handle).join(San)
                                   .where(San.name == place.san.name, Volume.vm_id == vm.id)))
    dropped = []
    for handle in place.backend.listing():
        volume, _, snap = handle.partition("@")
        if volume in replicas and (snap.startswith("rep-") or (not snap and volume not in live)):
            (place.backend.delete_snapshot if snap else place.backend.delete)(handle)
            dropped.append(handle)
    return {"san": place.san.name, "dropped": sorted(dropped)}


# -- drill-volumes --------------------------------------------------------------------------------------

def drill_volume(replica: str) -> str:
    return f"drill-{replica}"


def drill_target(config: Config, site: str, vm: VirtualMachine) -> str:
    return vm_target_iqn(config, site, vm).replace(".vm-", ".drill-", 1)


@workflow("drill-volumes")
def drill_volumes(ctx: JobContext) -> dict[str, Any]:
    """A drill's disks: the replica point cloned to volumes of their own, exported to this site's servers as a
    target of their own (the point and the replication go on untouched); with `end`, unexported and deleted."""
    place = san_place(ctx.rt.config, ctx.params.san)
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        rep = replication_of(session, vm)
        disks = [(d.replica, session.get(Volume, d.volume_id).iscsi_lun) for d in replica_disks(session, rep)]
        iqn = drill_target(ctx.rt.config, place.site.name, vm)
        initiators = site_initiators(session, place.site)
        point = None if ctx.params.end else chosen_point(session, rep, ctx.params.point).name
    if ctx.params.end:
        target_for(place.san).unexport(iqn, force=True)
        for replica, _ in disks:
            place.backend.delete(drill_volume(replica))
        return {"removed": iqn}
    ctx.phase("clone the point", progress=20)
    for replica, _ in disks:
        place.backend.delete(drill_volume(replica))
        place.backend.clone(snapshot_handle(replica, point), drill_volume(replica))
    ctx.phase("export", progress=60)
    export_luns(place, iqn, {lun: drill_volume(replica) for replica, lun in disks}, initiators)
    return {"target": iqn, "point": point, "san": place.san.name}
