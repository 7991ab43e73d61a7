"""`laxcluster check`: compare the inventory with what every SAN and server really holds, and repair
what is safe to repair.

The check asks each SAN (inspect-san) and each cluster server (inspect-node) through its own queue; a
SAN or server that has not answered within `timeout_s` is reported `unreachable` instead of holding the
check up. The inventory is read after the answers are in, and everything a job worked on meanwhile
(a job still running, or one that ended after the check started) is skipped as busy, so the report
shows drift, not the check's own time window. The comparison itself is tasks.inventory.drift.
"""

from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from config import Config
from errors import ChildrenTimedOut
from models import FINAL_STATES, SUCCEEDED, ClusterServer, Job, Lease, San, Template, VirtualMachine, Volume
from models.protection import Backup, ReplicaDisk, ReplicaPoint, Replication
from tasks.context import JobContext
from tasks.inventory import drift
from tasks.san.backups import USABLE
from tasks.san.storage import site_initiators
from tasks.workflow import workflow

# Lock targets (`<prefix>/<vm>`) of the jobs that change a VM's volumes, exports or domain.
VM_JOB_PREFIXES = ("vm/", "disks/", "domain/", "backup/", "replicate/", "replica/", "retire/", "drill/",
                   "drill-volumes/", "drill-domain/")
SNAPSHOT_KINDS = ("snapshot-backup", "prune-backups", "restore", "verify-backup", "restore-vm", "verify-boot")
REPAIR_TIMEOUT_S = 300


@workflow("check-cluster")
def check_cluster(ctx: JobContext) -> dict[str, Any]:
    """Inspect every SAN and server, compare, and with `repair` fix the safe drifts."""
    ctx.phase("inspect", progress=0)
    children = ctx.once("inspections", lambda: _spawn_inspections(ctx))
    report = ctx.once("report", lambda: _inspect_and_compare(ctx, children))
    drifts = [drift.Drift(**found) for found in report["drifts"]]
    outcomes = _repair(ctx, drifts) if ctx.params.repair and any(d.safe for d in drifts) else {}
    repaired = [d.as_dict() for d in drifts if outcomes.get(_outcome_key(d), {}).get("done")]
    failed = [{**d.as_dict(), "error": outcomes[_outcome_key(d)]["detail"]} for d in drifts
              if _outcome_key(d) in outcomes and not outcomes[_outcome_key(d)]["done"]]
    return {"drifts": report["drifts"], "clean": len(repaired) == len(drifts), "repaired": repaired,
            "repair_failed": failed, "busy": report["busy"], "inspected": report["inspected"]}


# -- inspect -----------------------------------------------------------------------------------------

def _spawn_inspections(ctx: JobContext) -> dict[str, dict[str, str]]:
    with ctx.session() as session:
        sans = list(session.scalars(select(San.name).order_by(San.name)))
        servers = list(session.scalars(select(ClusterServer.name).order_by(ClusterServer.name)))
    return {"sans": {san: ctx.spawn("inspect-san", {"san": san}) for san in sans},
            "servers": {server: ctx.spawn("inspect-node", {"server": server}) for server in servers}}


def _inspect_and_compare(ctx: JobContext, children: dict[str, dict[str, str]]) -> dict[str, Any]:
    ids = [*children["sans"].values(), *children["servers"].values()]
    try:
        ctx.wait_for_children(ids, ctx.params.timeout_s, start=0, end=70)
    except ChildrenTimedOut:
        pass  # whoever has not answered is reported unreachable
    jobs = {job.id: job for job in ctx.children(ids)}
    observed = observed_from(children, jobs, ctx.params.timeout_s)
    ctx.phase("compare", progress=70)
    with ctx.session() as session:
        inventory = read_inventory(session, ctx.rt.config, ctx.started_at)
    comparison = drift.compare(inventory, observed)
    return {"drifts": [found.as_dict() for found in comparison.drifts], "busy": comparison.busy,
            "inspected": {"sans": sorted(observed.sans), "servers": sorted(observed.servers)}}


def observed_from(children: dict[str, dict[str, str]], jobs: dict[str, Job], timeout_s: float) -> drift.Observed:
    """The inspections' results; a SAN or server whose job did not succeed is unreachable, saying why."""
    observed = drift.Observed()
    for resource, group in (("san", "sans"), ("server", "servers")):
        for name, job_id in children[group].items():
            job = jobs[job_id]
            if job.state != SUCCEEDED:
                observed.unreachable[name] = (resource, _why(job, timeout_s))
            elif resource == "san":
                observed.sans[name] = _san_facts(job.result)
            else:
                observed.servers[name] = tuple(drift.DomainFacts(**domain) for domain in job.result["domains"])
    return observed


def _why(job: Job, timeout_s: float) -> str:
    if job.error_message and job.error_code != "Cancelled":
        return f"{job.kind} failed: {job.error_code}: {job.error_message}"
    return f"{job.kind} on {job.queue} got no answer within {timeout_s:g} s"


def _san_facts(result: dict[str, Any]) -> drift.SanFacts:
    targets = tuple(drift.TargetFacts(t["iqn"], {int(lun): path for lun, path in t["luns"].items()},
                                      tuple(t["initiators"]), t["sessions"]) for t in result["targets"])
    host = result.get("host") or {}
    domains = host.get("domains")
    return drift.SanFacts(dict(result["volumes"]), targets,
                          None if domains is None else tuple(drift.DomainFacts(**domain) for domain in domains),
                          host.get("error"))


# -- the inventory -------------------------------------------------------------------------------------

def replica_points(session: Session) -> frozenset[tuple[str, str]]:
    """(san, handle) of every replication snapshot: the points on the peer, and each disk's base (on both sides)."""
    san_names = dict(session.execute(select(San.id, San.name)).tuples().all())
    found = {(san_names[point.san_id], f"{disk.replica}@{point.name}")
             for disk, point in session.execute(select(ReplicaDisk, ReplicaPoint).join(
                 ReplicaPoint, ReplicaPoint.replication_id == ReplicaDisk.replication_id)).tuples()}
    found |= {(san_names[volume.san_id], f"{volume.backend_handle}@{disk.base_point}")
              for disk, volume in session.execute(select(ReplicaDisk, Volume).join(Volume, Volume.id == ReplicaDisk.volume_id)
                                                  .where(ReplicaDisk.base_point.is_not(None))).tuples()}
    found |= {(san_names[peer], f"{disk.replica}@{disk.base_point}")
              for disk, peer in session.execute(select(ReplicaDisk, Replication.peer_san_id).join(Replication)
                                                .where(ReplicaDisk.base_point.is_not(None))).tuples()}
    return frozenset(found)


def replica_copies(session: Session) -> frozenset[tuple[str, str]]:
    """(peer san, replica) of every replicated disk: a copy that SAN may hold as a volume (a stale primary)."""
    rows = session.execute(select(San.name, ReplicaDisk.replica).join(Replication, Replication.peer_san_id == San.id)
                           .join(ReplicaDisk, ReplicaDisk.replication_id == Replication.id)).tuples().all()
    return frozenset(rows)


def read_inventory(session: Session, config: Config, since: datetime) -> drift.Inventory:
    """The rows the comparison needs, and what jobs work on since `since` (the check's start)."""
    san_names = dict(session.execute(select(San.id, San.name)).tuples().all())
    server_rows = session.execute(select(ClusterServer.id, ClusterServer.name, ClusterServer.libvirt_uri)).all()
    servers = {row.id: row.name for row in server_rows}
    vms = session.scalars(select(VirtualMachine)).all()
    by_id = {vm.id: vm for vm in vms}
    volumes = tuple(drift.VolumeRow(san_names[v.san_id], v.backend_handle, v.role, v.iscsi_target, v.iscsi_lun,
                                    by_id[v.vm_id].uuid if v.vm_id else None, by_id[v.vm_id].name if v.vm_id else None)
                    for v in session.scalars(select(Volume)))
    templates = tuple(drift.TemplateRow(san_names[t.san_id], t.backend_handle, t.name)
                      for t in session.scalars(select(Template)) if t.san_id is not None and t.backend_handle)
    targets, kinds = _jobs_since(session, since)
    busy_names = {target.split("/", 1)[1] for target in targets if target.startswith(VM_JOB_PREFIXES)}
    return drift.Inventory(
        volumes=volumes, templates=templates,
        vms=tuple(drift.VmRow(vm.id, vm.uuid, vm.name, servers.get(vm.server_id), vm.state) for vm in vms),
        leases=tuple(drift.LeaseRow(lease.id, lease.vm_id, lease.ip, lease.mac) for lease in session.scalars(select(Lease))),
        snapshots=frozenset(session.execute(select(Backup.san_name, Backup.snapshot)
                                            .where(Backup.snapshot.is_not(None))).tuples().all()) | replica_points(session),
        replicas=replica_copies(session),
        anchors=_anchors(session),
        initiators={san.name: site_initiators(session, site) for site, san in config.sans()},
        iqn_prefix=config.raw.get("iqn_prefix", ""),
        server_uris={row.name: row.libvirt_uri for row in server_rows},
        busy_vms=frozenset(vm.uuid for vm in vms if vm.name in busy_names),
        busy_template_sans=frozenset(target.split("/")[1] for target in targets if target.startswith("template/")),
        snapshots_busy=bool(kinds & set(SNAPSHOT_KINDS)),
    )


def _jobs_since(session: Session, since: datetime) -> tuple[set[str], set[str]]:
    """Lock targets and kinds of the jobs unfinished now or finished since `since`."""
    rows = session.execute(select(Job.target, Job.kind).where(
        or_(Job.state.not_in(FINAL_STATES), Job.finished_at >= since))).all()
    return {row.target for row in rows}, {row.kind for row in rows}


def _anchors(session: Session) -> tuple[drift.AnchorRow, ...]:
    """The snapshot of the newest usable backup of each volume in each store (what the next differential reads)."""
    newest = (select(Backup.san_name, Backup.volume_name, Backup.store_id, func.max(Backup.created_at).label("at"))
              .where(Backup.state.in_(USABLE), Backup.snapshot.is_not(None))
              .group_by(Backup.san_name, Backup.volume_name, Backup.store_id).subquery())
    rows = session.execute(select(Backup.san_name, Backup.snapshot, Backup.vm_name).join(newest, (
        (Backup.san_name == newest.c.san_name) & (Backup.volume_name == newest.c.volume_name)
        & (Backup.store_id == newest.c.store_id) & (Backup.created_at == newest.c.at)))).all()
    return tuple(drift.AnchorRow(row.san_name, row.snapshot, row.vm_name) for row in rows)


# -- repair --------------------------------------------------------------------------------------------

def _repair(ctx: JobContext, drifts: list[drift.Drift]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Run the safe repairs: leases here, the rest as repair-san / repair-node children; their outcomes by
    (where, op, what)."""
    plan = drift.plan_repairs(drifts)
    ctx.phase("repair", progress=75)
    outcomes = {("inventory", drift.DROP_LEASE, str(lease_id)): {"done": True, "detail": "dropped"}
                for lease_id in ctx.once("dropped leases", lambda: _drop_leases(ctx, plan.leases))}
    children = {**{ctx.spawn("repair-san", {"san": san, "actions": actions}): san for san, actions in plan.sans.items()},
                **{ctx.spawn("repair-node", {"server": server, "actions": actions}): server
                   for server, actions in plan.servers.items()}}
    try:
        ctx.wait_for_children(list(children), REPAIR_TIMEOUT_S, start=75, end=98)
    except ChildrenTimedOut:
        pass  # a repair that did not end is reported as not done
    for job in ctx.children(list(children)):
        for action in _action_outcomes(job):
            outcomes[(children[job.id], action["op"], action["what"])] = action
    return outcomes


def _action_outcomes(job: Job) -> list[dict[str, Any]]:
    """What a repair child did with each action; all of them not done if the child itself did not succeed."""
    if job.state == SUCCEEDED:
        return list(job.result["actions"])
    why = f"{job.kind} {job.state}: {job.error_message or 'did not end in time'}"
    return [{**action, "done": False, "detail": why} for action in job.params["actions"]]


def _drop_leases(ctx: JobContext, lease_ids: list[int]) -> list[int]:
    """Delete the leases whose VM row is (still) gone; the ids dropped."""
    with ctx.session() as session:
        orphans = list(session.scalars(select(Lease.id).where(
            Lease.id.in_(lease_ids), Lease.vm_id.is_not(None), Lease.vm_id.not_in(select(VirtualMachine.id)))))
        session.execute(delete(Lease).where(Lease.id.in_(orphans)))
    return orphans


def _outcome_key(found: drift.Drift) -> tuple[str, str, str]:
    action = drift.repair_action(found)
    return found.where, action["op"], action["what"]


def latest_report(session: Session) -> Job | None:
    """The newest check-cluster job that succeeded (its result is the report)."""
    return session.scalar(select(Job).where(Job.kind == "check-cluster", Job.state == SUCCEEDED, Job.parent_id.is_(None))
                          .order_by(Job.finished_at.desc()).limit(1))
