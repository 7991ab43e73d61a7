"""Moving VMs between cluster servers: `migrate` (one VM, live by default) and `evacuate` (every VM off
a server that goes into maintenance).

migrate, on the control queue, reads as its phases: pre-flight (every problem at once, nothing
changed), export storage (the VM's iSCSI target lets the destination's initiator in), migrate (a
`migrate-domain` child on the SOURCE server's queue holds the libvirt job), confirm. Whatever
happens, the VM ends running on exactly one server and the DB says which: the node child settles
both libvirts in its cleanup, the parent does so again in its own.
"""

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import FINAL_STATES, SUCCEEDED, ClusterServer, Job, VirtualMachine
from tasks import jobs
from tasks.context import JobContext, raise_unless_succeeded
from tasks.dispatch import cancel_key
from tasks.domains import domain_spec, record_state, vm_and_server
from tasks.placement import NoCapacity, capacity, place
from tasks.queues import CONTROL, node_queue, san_queue
from tasks.storage import target_for
from tasks.vms import find_vm, placed_on, site_and_san
from tasks.volumes import san_place, vm_target_iqn
from tasks.workflow import workflow
from workers.errors import Conflict, LaxError, NotFound
from workers.node import domains
from workers.node import migrate as driver
from workers.node.domain_xml import domain_xml
from workers.san.tgt import TargetNotFound

MIGRATE_TIMEOUT_S = 1800
SAN_TIMEOUT_S = 300
POLL_S = 0.5
EVACUATE_AT_ONCE = 2


class PreflightFailed(Conflict):
    """The migration cannot go ahead; `extra['problems']` lists every reason with what to do."""

    code = "PreflightFailed"


class EvacuationIncomplete(LaxError):
    code = "EvacuationIncomplete"
    http_status = 409


class ServerNotFound(NotFound):
    code = "ServerNotFound"


def vm_target(name: str) -> str:
    return f"vm/{name}"


# -- migrate --------------------------------------------------------------------------------------

def settle_after_migrate(ctx: JobContext) -> None:
    """Wait for the node child to end, then make both libvirts and the DB agree on one server."""
    children = _children(ctx, "migrate-domain")
    if not children:
        return  # nothing was moved yet: pre-flight and export change no libvirt
    ctx.wait_for_children(children, MIGRATE_TIMEOUT_S, cancellable=False)
    plan = _recorded(ctx)
    settle_and_record(ctx, plan["vm"], plan["source"], plan["destination"])


@workflow("migrate", cleanup=settle_after_migrate, rerun_after_crash=False)
def migrate_vm(ctx: JobContext) -> dict[str, Any]:
    """Move a VM to another server (live when it runs); with `check`, only report what stands in the way."""
    started = time.monotonic()
    name, live = ctx.params["vm"], bool(ctx.params.get("live", True))
    ctx.phase("pre-flight", progress=2)
    source, dest, problems = preflight(ctx, name, ctx.params.get("to"))
    plan = {"vm": name, "source": source, "destination": dest, "live": live}
    _record(ctx, {**plan, "problems": [p.as_dict() for p in problems]})
    if ctx.params.get("check"):
        return {**plan, "problems": [p.as_dict() for p in problems], "can_migrate": not problems}
    if problems:
        raise PreflightFailed(f"cannot migrate {name}: " + "; ".join(p.message for p in problems),
                              problems=[p.as_dict() for p in problems])
    ctx.phase("export storage", progress=5)
    export_to(ctx, name, dest)
    ctx.phase("migrate", progress=10)
    child = ctx.spawn("migrate-domain", f"domain/{name}", node_queue(source),
                      {**plan, "bandwidth_mib_s": ctx.params.get("bandwidth_mib_s")})
    (job,) = ctx.wait_for_children([child], MIGRATE_TIMEOUT_S, start=10, end=98)
    raise_unless_succeeded(job)
    return {**plan, **job.result, "total_ms": int((time.monotonic() - started) * 1000)}


def preflight(ctx: JobContext, name: str, asked: str | None) -> tuple[str, str, list[driver.Problem]]:
    """The VM's server, the destination (asked, or chosen by placement) and every problem found."""
    with ctx.session() as session:
        vm = find_vm(session, name)
        source = session.scalar(select(ClusterServer).where(ClusterServer.name == placed_on(session, vm)))
        try:
            dest = _destination(session, ctx, vm, source, asked)
        except NoCapacity as error:
            return source.name, "", [driver.Problem(error.code, f"{error.message}: free memory or add a server")]
        if dest.id == source.id:
            return source.name, dest.name, [driver.Problem("SameServer", f"{name} already runs on {dest.name}")]
        if dest.cluster_id != source.cluster_id:
            return source.name, dest.name, [driver.Problem(
                "OtherCluster", f"{dest.name} is not in {name}'s cluster, so it cannot reach its disks: "
                                "choose a server of the same cluster")]
        room = capacity(session, ctx.rt.config, dest, exclude_vm=vm.id)
        need = driver.Room(room.memory_bytes, room.vcpus, vm.memory_bytes, vm.vcpus)
        source_name, source_uri = source.name, source.libvirt_uri
        dest_name, dest_uri, in_maintenance = dest.name, dest.libvirt_uri, dest.maintenance
    problems = driver.preflight(source_uri, dest_uri, name, dest_name=dest_name, dest_maintenance=in_maintenance, room=need)
    return source_name, dest_name, problems


def _destination(session: Session, ctx: JobContext, vm: VirtualMachine, source: ClusterServer,
                 asked: str | None) -> ClusterServer:
    if asked:
        dest = session.scalar(select(ClusterServer).where(ClusterServer.name == asked))
        if dest is None:
            raise ServerNotFound(f"no cluster server {asked}", server=asked)
        return dest
    others = select(ClusterServer).where(ClusterServer.cluster_id == source.cluster_id, ClusterServer.id != source.id)
    return place(session, ctx.rt.config, list(session.scalars(others)), vm.memory_bytes, vm.vcpus, exclude_vm=vm.id)


def export_to(ctx: JobContext, name: str, server: str) -> None:
    """Make sure the VM's iSCSI target lets `server`'s initiator log in (a SAN child job)."""
    with ctx.session() as session:
        site, san = site_and_san(session, find_vm(session, name))
        initiator = session.scalar(select(ClusterServer.initiator_iqn).where(ClusterServer.name == server))
    ctx.run_child("export-vm-disks", f"disks/{name}", san_queue(site), {"vm": name, "san": san, "initiator": initiator},
                  timeout=SAN_TIMEOUT_S, start=5, end=10)


@workflow("export-vm-disks")
def export_vm_disks(ctx: JobContext) -> dict[str, Any]:
    """Add an initiator to the ACL of the VM's target (its LUNs are already exported at install)."""
    san = san_place(ctx.rt.config, ctx.params["san"])
    iqn = vm_target_iqn(ctx.rt.config, san.site.name, ctx.params["vm"])
    tgt = target_for(san.san)
    target = tgt.find(iqn)
    if target is None:
        raise TargetNotFound(f"the SAN exports no target {iqn} for {ctx.params['vm']}: start the VM once to re-export it",
                             iqn=iqn)
    wanted = ctx.params["initiator"]
    if wanted not in target.initiators:
        tgt.bind_initiators(iqn, [*target.initiators, wanted])
    return {"target": iqn, "initiators": sorted({*target.initiators, wanted}), "bound": wanted not in target.initiators}


# -- the node side ------------------------------------------------------------------------------------

def settle_domain(ctx: JobContext) -> None:
    settle_and_record(ctx, ctx.params["vm"], ctx.params["source"], ctx.params["destination"])


@workflow("migrate-domain", cleanup=settle_domain, rerun_after_crash=False)
def migrate_domain(ctx: JobContext) -> dict[str, Any]:
    """Run the libvirt migration from this (the source) server, reporting its job stats as progress."""
    name = ctx.params["vm"]
    with ctx.session() as session:
        vm, source = vm_and_server(session, name, ctx.params["source"])
        _, dest = vm_and_server(session, name, ctx.params["destination"])
        xml = domain_xml(domain_spec(session, vm, dest))
        source_uri, dest_uri = source.libvirt_uri, dest.libvirt_uri
    ctx.phase("transfer memory", progress=5)

    def progress(sample: driver.MigrationProgress) -> None:
        ctx.report.update(progress=5 + 0.9 * sample.percent, bytes_done=sample.memory_total - sample.memory_remaining,
                          bytes_total=sample.memory_total,
                          message=f"iteration {sample.iteration}, dirty rate {sample.dirty_rate} pages/s")

    try:
        outcome = driver.migrate(source_uri, dest_uri, name, xml, live=bool(ctx.params.get("live", True)),
                                 on_progress=progress, should_abort=lambda: bool(ctx.rt.redis.exists(cancel_key(ctx.job_id))),
                                 bandwidth_mib_s=ctx.params.get("bandwidth_mib_s"))
    except driver.MigrationAborted:
        raise jobs.JobCancelled(ctx.job_id) from None
    ctx.phase("confirm", progress=96)
    where = settle_and_record(ctx, name, ctx.params["source"], ctx.params["destination"])
    if where != ctx.params["destination"]:
        raise driver.MigrationFailed(f"libvirt reported success but {name} runs on {where}", server=where)
    return outcome.as_dict()


def settle_and_record(ctx: JobContext, name: str, source: str, dest: str) -> str:
    """Make `name` run on exactly one of the two servers and record that one (and its state) in the DB."""
    with ctx.session() as session:
        _, src = vm_and_server(session, name, source)
        _, dst = vm_and_server(session, name, dest)
        uris = {source: src.libvirt_uri, dest: dst.libvirt_uri}
    side = driver.settle(uris[source], uris[dest], name)
    where = source if side == "source" else dest
    state = domains.domain_state(uris[where], name)
    with ctx.session() as session:
        vm, server = vm_and_server(session, name, where)
        if vm is not None:
            vm.server_id = server.id
            record_state(session, vm, state)
    return where


# -- evacuate -------------------------------------------------------------------------------------

@workflow("evacuate")
def evacuate(ctx: JobContext) -> dict[str, Any]:
    """Put a server into maintenance and move every VM on it elsewhere, a few at a time, as migrate jobs."""
    name = ctx.target.removeprefix("server/")
    ctx.phase("maintenance", progress=1)
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
        if server is None:
            raise ServerNotFound(f"no cluster server {name}", server=name)
        server.maintenance = True
        vms = list(session.scalars(select(VirtualMachine).where(VirtualMachine.server_id == server.id)
                                   .order_by(VirtualMachine.name)))
        plan, failed = plan_destinations(session, ctx, server, vms)
    ctx.phase("migrate", progress=2)
    moved, refused = _migrate_all(ctx, plan, len(vms))
    failed.update(refused)
    result = {"server": name, "moved": moved, "failed": failed}
    _record(ctx, result)
    if failed:
        raise EvacuationIncomplete(f"{len(failed)} of {len(vms)} VMs could not leave {name}: "
                                   + "; ".join(f"{vm}: {why}" for vm, why in failed.items()), failed=failed)
    return result


def plan_destinations(session: Session, ctx: JobContext, server: ClusterServer,
                      vms: list[VirtualMachine]) -> tuple[dict[str, str], dict[str, str]]:
    """A destination for each VM, biggest first, counting the VMs planned before it (they move at the
    same time, so placement alone would not see them); {vm: server} and {vm: why none fits}."""
    others = list(session.scalars(select(ClusterServer).where(ClusterServer.cluster_id == server.cluster_id,
                                                              ClusterServer.id != server.id)))
    taken = {other.name: (0, 0) for other in others}
    planned, failed = {}, {}
    for vm in sorted(vms, key=lambda v: (-v.memory_bytes, v.name)):
        left = {other.name: _room_left(session, ctx, other, vm, taken[other.name]) for other in others}
        fitting = [o for o in others if left[o.name][0] >= vm.memory_bytes and left[o.name][1] >= vm.vcpus]
        try:
            dest = place(session, ctx.rt.config, fitting, vm.memory_bytes, vm.vcpus, exclude_vm=vm.id)
        except NoCapacity:
            rooms = "; ".join(f"{name}: {memory // 2**20} MiB, {vcpus} vCPUs free" for name, (memory, vcpus) in left.items())
            failed[vm.name] = (f"no server has room for {vm.memory_bytes // 2**20} MiB and {vm.vcpus} vCPUs beside the "
                               f"VMs leaving with it ({rooms or 'no other server in the cluster'})")
            continue
        planned[vm.name] = dest.name
        memory, vcpus = taken[dest.name]
        taken[dest.name] = (memory + vm.memory_bytes, vcpus + vm.vcpus)
    return planned, failed


def _room_left(session: Session, ctx: JobContext, server: ClusterServer, vm: VirtualMachine,
               taken: tuple[int, int]) -> tuple[int, int]:
    room = capacity(session, ctx.rt.config, server, exclude_vm=vm.id)
    return room.memory_bytes - taken[0], room.vcpus - taken[1]


def _migrate_all(ctx: JobContext, plan: dict[str, str], total: int) -> tuple[dict[str, str], dict[str, str]]:
    """Run one migrate child per planned VM, EVACUATE_AT_ONCE at a time; return {vm: new server} and {vm: why not}."""
    pending, running = list(plan), {}
    moved, failed = {}, {}
    while pending or running:
        while pending and len(running) < EVACUATE_AT_ONCE:
            vm = pending.pop(0)
            try:
                running[ctx.spawn("migrate", vm_target(vm), CONTROL, {"vm": vm, "to": plan[vm], "live": True})] = vm
            except jobs.TargetBusy as error:
                failed[vm] = f"busy with job {error.extra['job_id']}"
        children = ctx.children(list(running))
        for job in children:
            if job.state in FINAL_STATES:
                vm = running.pop(job.id)
                if job.state == SUCCEEDED:
                    moved[vm] = job.result.get("destination")
                else:
                    failed[vm] = job.error_message or job.state
        done = total - len(plan) + len(moved) + len(failed) + sum(j.progress / 100 for j in children
                                                                  if j.state not in FINAL_STATES)
        ctx.report.update(progress=2 + 97 * done / max(total, 1))
        ctx.pass_cancel_on(list(running))
        time.sleep(POLL_S)
    return moved, failed


# -- child jobs and the recorded plan -----------------------------------------------------------------

def _children(ctx: JobContext, kind: str) -> list[str]:
    with ctx.session() as session:
        return list(session.scalars(select(Job.id).where(Job.parent_id == ctx.job_id, Job.kind == kind)))


def _record(ctx: JobContext, result: dict[str, Any]) -> None:
    """Keep what is known so far on the job's result, so a failed job still shows it."""
    with ctx.session() as session:
        session.get(Job, ctx.job_id).result = result


def _recorded(ctx: JobContext) -> dict[str, Any]:
    with ctx.session() as session:
        return dict(session.get(Job, ctx.job_id).result or {})
