"""High availability inside a site. A server has failed when neither its node worker's heartbeat nor its
libvirtd has answered for `ha.failed_after_s` (one missed signal is not a failure: a libvirtd restart or a
worker restart alone never triggers it). `recover-server` then fences it at the SAN first, and only after
the fence is confirmed restarts its VMs that want to run (ha on) on the other servers of its cluster,
higher `ha_priority` first, as many as fit; what does not fit is reported, not lost (it stays placed on the
fenced server, wanted running). The server stays fenced, in maintenance, until `server activate`.
"""

import time
from typing import Any

from sqlalchemy import select

from errors import LaxError, RecoveryIncomplete
from models import SUCCEEDED, AuditEvent, ClusterServer, VirtualMachine
from tasks import runtime, submission
from tasks.app import app
from tasks.context import JobContext
from tasks.control.evacuate import plan_destinations
from tasks.node.heartbeat import silence_key, worker_key
from tasks.runtime import Runtime
from tasks.workflow import workflow
from workers.node.host import answers

FENCE_TIMEOUT_S = 120
RESTART_TIMEOUT_S = 600
ACTOR = "ha"


def signals(rt: Runtime, server: str, uri: str) -> dict[str, bool]:
    """Which of the server's signals answer now: its node worker's heartbeat, its libvirtd."""
    return {"node worker": bool(rt.redis.exists(worker_key(server))), "libvirtd": answers(uri)}


@app.task(name="laxcluster.watch_servers")
def watch_servers() -> dict[str, list[str]]:
    """Beat's HA tick: start `recover-server` for every unfenced server silent for `failed_after_s`."""
    rt = runtime.current()
    settings = rt.config.section("ha")
    if not settings.get("enabled", False):
        return {"failed": [], "recovering": []}
    with rt.sessions() as session:
        watched = session.execute(select(ClusterServer.name, ClusterServer.libvirt_uri)
                                  .where(ClusterServer.fenced_at.is_(None))).all()
    failed = [name for name, uri in watched if _silent_for(rt, name, uri) >= float(settings["failed_after_s"])]
    return {"failed": failed, "recovering": [name for name in failed if _start_recovery(rt, name)]}


def _silent_for(rt: Runtime, server: str, uri: str) -> float:
    """How long every signal of the server has been silent (0 while one answers)."""
    key = silence_key(server)
    if any(signals(rt, server, uri).values()):
        rt.redis.delete(key)
        return 0.0
    rt.redis.set(key, time.time(), nx=True)
    return time.time() - float(rt.redis.get(key) or time.time())


def _start_recovery(rt: Runtime, server: str) -> bool:
    try:
        submission.start(rt, app, "recover-server", {"server": server}, submission.Requester(ACTOR))
        return True
    except LaxError:
        return False  # one runs already (its lock), or the broker is away: the next tick tries again


@workflow("recover-server")
def recover_server(ctx: JobContext) -> dict[str, Any]:
    """Fence the failed server, then restart its VMs elsewhere; fails if some wanted VMs could not."""
    name = ctx.params.server
    ctx.phase("confirm", progress=1)
    seen = ctx.once("signals", lambda: signals(ctx.rt, name, _uri(ctx, name)))
    if any(seen.values()):
        return {"server": name, "recovered": False, "signals": seen}
    ctx.phase("fence", progress=5)
    fenced = ctx.run_child("fence-server", {"server": name}, timeout=FENCE_TIMEOUT_S, start=5, end=30)
    ctx.phase("plan", progress=30)
    plan = ctx.once("plan", lambda: _plan_and_place(ctx, name))
    ctx.phase("restart", progress=35)
    restarted, failed = _restart_all(ctx, plan["restart"])
    result = {"server": name, "recovered": True, "signals": seen, "fenced_targets": fenced["targets"],
              "sessions_dropped": fenced["sessions_dropped"],
              "restarted": restarted, "failed": {**plan["unplaced"], **failed}, "opted_out": plan["opted_out"]}
    ctx.record_result(result)
    if result["failed"]:
        raise RecoveryIncomplete(f"{len(result['failed'])} VM(s) of {name} could not be restarted: "
                                 + "; ".join(f"{vm}: {why}" for vm, why in result["failed"].items()),
                                 failed=result["failed"])
    return result


def _uri(ctx: JobContext, name: str) -> str:
    with ctx.session() as session:
        return session.scalar(select(ClusterServer.libvirt_uri).where(ClusterServer.name == name))


def _plan_and_place(ctx: JobContext, name: str) -> dict[str, Any]:
    """Choose a server for each VM to restart, by priority, and place it there now (its domain on the fenced
    server can no longer reach its disks); every decision is an audit event."""
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
        placed = list(session.scalars(select(VirtualMachine).where(VirtualMachine.server_id == server.id,
                                                                   VirtualMachine.desired_state == "running")))
        wanted = [vm for vm in placed if vm.ha]
        plan, unplaced = plan_destinations(session, ctx, server, wanted, order=lambda vm: (-vm.ha_priority, vm.name))
        destinations = {row.name: row.id for row in session.scalars(select(ClusterServer))}
        for vm in wanted:
            if vm.name in plan:
                vm.server_id = destinations[plan[vm.name]]
            _audit(session, ctx, vm, plan.get(vm.name), unplaced.get(vm.name))
    return {"restart": plan, "unplaced": unplaced, "opted_out": sorted(vm.name for vm in placed if not vm.ha)}


def _audit(session, ctx: JobContext, vm: VirtualMachine, destination: str | None, why_not: str | None) -> None:
    details = {"job_id": ctx.job_id, "server": ctx.params.server, "priority": vm.ha_priority}
    if destination is not None:
        session.add(AuditEvent(actor=ACTOR, action="vm.ha-restart", target=f"vm/{vm.name}",
                               details={**details, "to": destination}))
    else:
        session.add(AuditEvent(actor=ACTOR, action="vm.ha-unplaced", target=f"vm/{vm.name}",
                               details={**details, "why": why_not}))


def _restart_all(ctx: JobContext, plan: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A `start` child per placed VM, all at once; {vm: server} started and {vm: why not}."""
    children = {vm: ctx.spawn("start", {"vm": vm}, step=f"restart {vm}") for vm in plan}
    ended = {job.id: job for job in ctx.wait_for_children(list(children.values()), RESTART_TIMEOUT_S, 35, 99)}
    restarted = {vm: plan[vm] for vm, job_id in children.items() if ended[job_id].state == SUCCEEDED}
    failed = {vm: ended[job_id].error_message or ended[job_id].state for vm, job_id in children.items()
              if ended[job_id].state != SUCCEEDED}
    return restarted, failed
