"""DR replication in the inventory: a VM's replication, its points, which site is primary, and its status.

A VM's primary site is the site of the SAN its disk is on: a failover moves the VM's volume rows to the DR
SAN (and raises the VM's generation), so every job that starts or exports the VM asks `refuse_if_not_primary`
with the site it works at, and a job planned before a failover carries the generation it saw.
"""

from datetime import datetime
from typing import Any

from croniter import croniter
from sqlalchemy import select
from sqlalchemy.orm import Session

from errors import InvalidInput, NoDrSite, NoReplicaPoint, NotPrimary, ReplicationNotEnabled
from models import Job, San, Site, VirtualMachine, Volume, utcnow
from models.protection import ReplicaDisk, ReplicaPoint, Replication
from workers.san.replication import point_order, validate_point

MODES = ("continuous", "scheduled")
# The volumes of a VM that replicate: boot disk, NoCloud seed (the DR copy boots with it) and data disks.
REPLICATED_ROLES = ("disk", "seed", "data")


def point_name(seq: int) -> str:
    return validate_point(f"rep-{seq}")


def replication_of(session: Session, vm: VirtualMachine) -> Replication:
    rep = session.scalar(select(Replication).where(Replication.vm_id == vm.id))
    if rep is None:
        raise ReplicationNotEnabled(f"{vm.name} is not replicated: `laxcluster dr enable {vm.name}` first", vm=vm.name)
    return rep


def primary_san(session: Session, vm: VirtualMachine) -> San | None:
    """The SAN holding the VM's boot disk (None before it has one)."""
    return session.scalar(select(San).join(Volume, Volume.san_id == San.id)
                          .where(Volume.vm_id == vm.id, Volume.role == "disk").limit(1))


def refuse_if_not_primary(session: Session, vm: VirtualMachine, site_id: int, generation: int | None = None) -> None:
    """NotPrimary unless the VM's disks are at site `site_id` (and, when given, its generation is still `generation`):
    the old site of a failed-over VM never starts or exports its stale copy."""
    san = primary_san(session, vm)
    if san is not None and san.site_id != site_id:
        raise NotPrimary(f"{vm.name} is primary at site {session.get(Site, san.site_id).name} (generation "
                         f"{vm.generation}): this site's copy is stale", vm=vm.name, generation=vm.generation)
    if generation is not None and generation != vm.generation:
        raise NotPrimary(f"{vm.name} failed over meanwhile (generation {generation} is now {vm.generation})",
                         vm=vm.name, generation=vm.generation)


def dr_san(session: Session, vm: VirtualMachine, site_name: str | None) -> San:
    """The SAN that will hold the VM's replicas: the one of `site_name`, or of the only other site."""
    primary = primary_san(session, vm)
    if primary is None:
        raise NoDrSite(f"{vm.name} has no disk yet", vm=vm.name)
    query = select(San).join(Site).where(San.site_id != primary.site_id)
    if site_name is not None:
        query = query.where(Site.name == site_name)
    sans = session.scalars(query.order_by(San.id)).all()
    if not sans:
        where = f"site {site_name}" if site_name else "another site"
        raise NoDrSite(f"no SAN at {where} to replicate {vm.name} to (its own site cannot be its DR site)",
                       vm=vm.name, site=site_name)
    return sans[0]


def check_schedule(mode: str, schedule: str | None) -> None:
    if mode not in MODES:
        raise InvalidInput(f"mode is one of {', '.join(MODES)}", field="mode")
    if mode == "scheduled" and (not schedule or not croniter.is_valid(schedule)):
        raise InvalidInput("a scheduled replication needs a cron line (e.g. `*/15 * * * *`)", field="schedule")
    if mode == "continuous" and schedule:
        raise InvalidInput("a continuous replication has no schedule", field="schedule")


def points(session: Session, rep: Replication) -> list[ReplicaPoint]:
    """The consistent points on the peer SAN, newest first."""
    rows = session.scalars(select(ReplicaPoint).where(ReplicaPoint.replication_id == rep.id,
                                                      ReplicaPoint.san_id == rep.peer_san_id)).all()
    return sorted(rows, key=lambda p: point_order(p.name), reverse=True)


def chosen_point(session: Session, rep: Replication, name: str | None) -> ReplicaPoint:
    """The point `name` on the peer, or the newest; NoReplicaPoint if there is none such."""
    held = points(session, rep)
    chosen = next((p for p in held if name is None or p.name == name), None)
    if chosen is None:
        raise NoReplicaPoint(f"no replica point {name or ''} on the peer SAN (it holds: "
                             f"{', '.join(p.name for p in held) or 'none'})".replace("  ", " "), point=name)
    return chosen


def replica_disks(session: Session, rep: Replication) -> list[ReplicaDisk]:
    return list(session.scalars(select(ReplicaDisk).where(ReplicaDisk.replication_id == rep.id)
                                .order_by(ReplicaDisk.volume_id)))


def last_job(session: Session, vm_name: str) -> Job | None:
    return session.scalar(select(Job).where(Job.kind == "replicate-to-dr", Job.target == f"replicate/{vm_name}")
                          .order_by(Job.created_at.desc()).limit(1))


def status(session: Session, vm: VirtualMachine, rep: Replication, now: datetime | None = None) -> dict[str, Any]:
    """What `dr status` and `GET /vms/<name>/replication` show: newest consistent point, RPO, state."""
    now = now or utcnow()
    held = points(session, rep)
    newest = held[0] if held else None
    rpo = (now - newest.taken_at).total_seconds() if newest else None
    job = last_job(session, vm.name)
    primary = primary_san(session, vm)
    return {
        "vm": vm.name, "mode": rep.mode, "schedule": rep.schedule, "rpo_target_s": rep.rpo_target_s,
        "bandwidth_limit_bytes_s": rep.bandwidth_limit_bytes_s, "keep": rep.keep, "enabled": rep.enabled,
        "primary_site": session.get(Site, primary.site_id).name if primary else None,
        "peer_san": session.get(San, rep.peer_san_id).name, "generation": vm.generation,
        "state": replication_state(rep, rpo), "newest_point": newest.name if newest else None,
        "newest_point_at": newest.taken_at.isoformat() + "Z" if newest else None,
        "rpo_s": round(rpo, 1) if rpo is not None else None, "bytes_behind": rep.bytes_behind,
        "rate_bytes_s": int(newest.bytes_sent / newest.seconds) if newest and newest.seconds > 0 else 0,
        "points": [{"name": p.name, "taken_at": p.taken_at.isoformat() + "Z", "bytes_changed": p.bytes_changed,
                    "bytes_sent": p.bytes_sent, "seconds": round(p.seconds, 3)} for p in held],
        "last_job": {"id": job.id, "state": job.state, "error": job.error_message} if job else None,
    }


def replication_state(rep: Replication, rpo: float | None) -> str:
    """`paused` (failed over, or switched off), `initial` (no point yet), `alert` (RPO above target), else `ok`."""
    if not rep.enabled:
        return "paused"
    if rpo is None:
        return "initial"
    return "alert" if rpo > rep.rpo_target_s else "ok"
