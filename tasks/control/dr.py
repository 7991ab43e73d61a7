"""DR workflows on the control queue: failover to the peer site, failback home, and drills.

A planned failover loses nothing: the VM stops, the last changes ship, the old site's target goes, the
newest point becomes the VM's disks at the DR site and the VM starts there (same MAC and lease). An unplanned
one starts from the newest point (or a chosen one) at once, trying to retire the old site's copy without
waiting for it: a site that comes back later finds the VM primary elsewhere (its disks' rows moved, its
generation raised) and refuses to export or start the stale copy. Failback ships what changed at the DR site
since the failover (the point both sides hold is the base) while the VM runs, then fails over home, planned,
and replication resumes towards the DR site.
"""

from typing import Any

from sqlalchemy import select

from errors import ChildrenTimedOut, Conflict, DrillFailed, NoReplicaPoint
from models import ClusterServer, San, Site
from tasks.context import JobContext, raise_unless_succeeded
from tasks.control.replicas import drop_replicas, wait_for_ship
from tasks.control.vms import choose_server
from tasks.inventory.dr import chosen_point, primary_san, replication_of
from tasks.inventory.vms import ACTIVE_STATES, find_vm
from tasks.workflow import workflow

SAN_TIMEOUT_S = 1800
NODE_TIMEOUT_S = 300
# How long an unplanned failover waits for the old site to retire its copy before going on without it.
UNREACHABLE_AFTER_S = 20


def failover_plan(ctx: JobContext, planned: bool) -> dict[str, Any]:
    """Where the VM is and where it goes, fixed at the first run; replication paused (no new ship starts)."""
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        rep = replication_of(session, vm)
        old, dr = primary_san(session, vm), session.get(San, rep.peer_san_id)
        if old.id == dr.id:
            raise Conflict(f"{vm.name} is primary at its peer's site already", vm=vm.name)
        if not planned:
            chosen_point(session, rep, ctx.params.point)
        server = session.get(ClusterServer, vm.server_id) if vm.server_id else None
        rep.enabled = False
        return {"old_san": old.name, "dr_san": dr.name, "dr_site": session.get(Site, dr.site_id).name,
                "server": server.name if server else None, "running": vm.state in ACTIVE_STATES,
                "server_reachable": bool(server and server.reachable is not False)}


def switch_site(ctx: JobContext, planned: bool, point: str | None, start: float, end: float) -> dict[str, Any]:
    """The failover's phases between `start` and `end` percent; returns where the VM runs and from which point."""
    name = ctx.params.vm
    plan = ctx.once("plan", lambda: failover_plan(ctx, planned))
    span = end - start

    def at(fraction: float) -> float:
        return start + span * fraction

    wait_for_ship(ctx)
    shipped = None
    if planned:
        if plan["running"]:
            ctx.phase("stop the VM", progress=at(0.05))
            ctx.run_child("power-domain", {"vm": name, "server": plan["server"], "action": "shutdown", "timeout_s": 120},
                          timeout=NODE_TIMEOUT_S, start=at(0.05), end=at(0.2))
        ctx.phase("final sync", progress=at(0.2))
        shipped = ctx.run_child("replicate-to-dr", {"vm": name}, timeout=SAN_TIMEOUT_S, start=at(0.2), end=at(0.5))
        point = shipped["point"]
    # Promoted first: from then on the inventory has the VM at the DR site, so nothing (a SAN worker restoring its
    # exports after a restart, a start) serves the old copy again, whatever happens to the retiring below.
    ctx.phase("promote the replica", progress=at(0.5))
    promoted = ctx.run_child("promote-replica", {"vm": name, "san": plan["dr_san"], "point": point},
                             timeout=SAN_TIMEOUT_S, start=at(0.5), end=at(0.65))
    ctx.phase("retire the old copy", progress=at(0.65))
    retired = retire_old_copy(ctx, plan, planned, at(0.65), at(0.75))
    ctx.phase("start at the DR site", progress=at(0.75))
    server = choose_server(ctx, name, ctx.params.server)
    with ctx.session() as session:
        generation = find_vm(session, name).generation
    started = ctx.run_child("start-domain", {"vm": name, "server": server, "generation": generation},
                            timeout=NODE_TIMEOUT_S, start=at(0.75), end=end)
    return {"vm": name, "site": plan["dr_site"], "server": server, "state": started["state"],
            "point": promoted["point"], "point_taken_at": promoted["taken_at"], "generation": generation,
            "old_copy_retired": retired, "final_sync": shipped}


def retire_old_copy(ctx: JobContext, plan: dict[str, Any], planned: bool, start: float, end: float) -> bool:
    """The old site's target for the VM goes, and its domain on the old server. Planned: both must succeed, and
    the old volumes go too (the final sync shipped everything; the base snapshot stays for failback). Unplanned:
    tried, going on without the old site if it does not answer soon (a SAN worker coming back revokes the
    target of a VM primary elsewhere, `check --repair` removes the stopped domain)."""
    name = ctx.params.vm
    children = [ctx.spawn("retire-copy", {"vm": name, "san": plan["old_san"], "drop": planned})]
    if plan["server"] and (planned or plan["server_reachable"]):
        children.append(ctx.spawn("remove-domain", {"vm": name, "server": plan["server"]}))
    timeout = SAN_TIMEOUT_S if planned else UNREACHABLE_AFTER_S
    try:
        ended = ctx.wait_for_children(children, timeout, start, end)
    except ChildrenTimedOut:
        if planned:
            raise
        return False
    if planned:
        for child in ended:
            raise_unless_succeeded(child)
    return all(child.state == "succeeded" for child in ended)


@workflow("failover")
def failover(ctx: JobContext) -> dict[str, Any]:
    """Run the VM at its peer site: planned (no data lost) or from a replica point (the primary site is gone)."""
    result = switch_site(ctx, ctx.params.planned, ctx.params.point, 0, 98)
    return {**result, "planned": ctx.params.planned}


def check_failed_over(ctx: JobContext) -> bool:
    """Conflict unless the VM runs at its DR site with a point both sites hold."""
    name = ctx.params.vm
    with ctx.session() as session:
        rep = replication_of(session, find_vm(session, name))
        if rep.enabled:
            raise Conflict(f"{name} has not failed over: its replication runs (`dr failover` first)", vm=name)
        if rep.base_point is None:
            raise NoReplicaPoint(f"{name} has no point both sites hold to fail back from", vm=name)
    return True


@workflow("failback")
def failback(ctx: JobContext) -> dict[str, Any]:
    """Ship what changed at the DR site since the failover to the old primary, then fail over home (planned),
    and let replication run towards the DR site again."""
    name = ctx.params.vm
    # Checked once: a run after a crash finds the replication as this job left it.
    ctx.once("failed over", lambda: check_failed_over(ctx))
    ctx.phase("ship the changes home", progress=2)
    reverse = ctx.run_child("replicate-to-dr", {"vm": name}, timeout=SAN_TIMEOUT_S, start=2, end=40)
    result = switch_site(ctx, True, None, 40, 97)
    with ctx.session() as session:
        replication_of(session, find_vm(session, name)).enabled = True
    final = result.pop("final_sync") or {}
    return {**result, "bytes_changed": reverse["bytes_changed"] + final.get("bytes_changed", 0),
            "bytes_sent": reverse["bytes_sent"] + final.get("bytes_sent", 0), "ships": [reverse, final]}


@workflow("disable-replication")
def disable_replication(ctx: JobContext) -> dict[str, Any]:
    """Stop shipping, drop the point snapshots on both SANs, forget the replication."""
    ctx.phase("drop replica points", progress=20)
    sans = drop_replicas(ctx, 20, 90)
    with ctx.session() as session:
        session.delete(replication_of(session, find_vm(session, ctx.params.vm)))
    return {"vm": ctx.params.vm, "dropped": sans}


def dr_servers(ctx: JobContext, site: str) -> list[str]:
    with ctx.session() as session:
        return list(session.scalars(select(ClusterServer.name).join(ClusterServer.cluster).join(Site)
                                    .where(Site.name == site).order_by(ClusterServer.name)))



def drill_plan(ctx: JobContext) -> dict[str, Any]:
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        rep = replication_of(session, vm)
        point = chosen_point(session, rep, ctx.params.point)
        peer = session.get(San, rep.peer_san_id)
        site = session.get(Site, peer.site_id).name
    servers = dr_servers(ctx, site)
    if ctx.params.server is not None and ctx.params.server not in servers:
        raise Conflict(f"{ctx.params.server} is not a server of the DR site {site}", server=ctx.params.server)
    if not servers:
        raise Conflict(f"the DR site {site} has no server to boot a drill on", site=site)
    return {"san": peer.name, "site": site, "point": point.name, "server": ctx.params.server or servers[0]}


def end_drill(ctx: JobContext) -> None:
    """The drill's domain and volumes go, whatever of them a run made."""
    plan = ctx.remembered("plan")
    if plan is None:
        return
    ctx.report.update(phase="tear down")
    ctx.run_child("drill-domain", {"vm": ctx.params.vm, "server": plan["server"], "end": True},
                  timeout=NODE_TIMEOUT_S, start=90, end=95, cancellable=False)
    ctx.run_child("drill-volumes", {"vm": ctx.params.vm, "san": plan["san"], "end": True},
                  timeout=SAN_TIMEOUT_S, start=95, end=99, cancellable=False)


@workflow("drill", cleanup=end_drill)
def drill(ctx: JobContext) -> dict[str, Any]:
    """Clone a replica point at the DR site, boot it there with no network, check the guest comes up, tear it down."""
    plan = ctx.once("plan", lambda: drill_plan(ctx))
    ctx.phase("clone the replica point", progress=5)
    volumes = ctx.run_child("drill-volumes", {"vm": ctx.params.vm, "san": plan["san"], "point": plan["point"]},
                            timeout=SAN_TIMEOUT_S, start=5, end=20)
    ctx.phase("boot it isolated", progress=20)
    booted = ctx.run_child("drill-domain", {"vm": ctx.params.vm, "server": plan["server"],
                                            "target": volumes["target"], "san": plan["san"]},
                           timeout=NODE_TIMEOUT_S, start=20, end=90)
    end_drill(ctx)
    if not booted["came_up"]:
        raise DrillFailed(f"the replica {plan['point']} of {ctx.params.vm} did not come up at {plan['site']}: "
                          f"{booted['detail']}", point=plan["point"])
    return {"vm": ctx.params.vm, "point": plan["point"], "site": plan["site"], "server": plan["server"],
            "came_up": booted["came_up"], "detail": booted["detail"]}
