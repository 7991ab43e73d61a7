"""`evacuate`: put a server into maintenance and move every VM on it elsewhere, as migrate jobs."""

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from errors import EvacuationIncomplete, NoCapacity, NoVmNetwork, ServerNotFound, TargetBusy
from models import FINAL_STATES, SUCCEEDED, ClusterServer, VirtualMachine
from tasks.context import JobContext
from tasks.control.migrate import MIGRATE_TIMEOUT_S
from tasks.inventory.placement import capacity, place
from tasks.inventory.vmnet import on_network
from tasks.workflow import workflow

EVACUATE_AT_ONCE = 2


@workflow("evacuate")
def evacuate(ctx: JobContext) -> dict[str, Any]:
    """Put a server into maintenance and move every VM on it elsewhere, a few at a time, as migrate jobs."""
    name = ctx.params.server
    ctx.phase("maintenance", progress=1)
    # Planned once: VMs that have left by a later run are no longer on the server, but still in the plan.
    planned = ctx.once("plan", lambda: _enter_maintenance_and_plan(ctx, name))
    plan, failed, total = planned["plan"], dict(planned["failed"]), planned["total"]
    ctx.phase("migrate", progress=2)
    moved, refused = _migrate_all(ctx, plan, total)
    failed.update(refused)
    result = {"server": name, "moved": {**planned["moved"], **moved}, "failed": failed, "left": planned["left"]}
    ctx.record_result(result)
    if failed:
        raise EvacuationIncomplete(f"{len(failed)} of {total} VMs could not leave {name}: "
                                   + "; ".join(f"{vm}: {why}" for vm, why in failed.items()), failed=failed)
    return result


def _enter_maintenance_and_plan(ctx: JobContext, name: str) -> dict[str, Any]:
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
        if server is None:
            raise ServerNotFound(f"no cluster server {name}", server=name)
        server.maintenance = True
        placed = list(session.scalars(select(VirtualMachine).where(VirtualMachine.server_id == server.id)
                                      .order_by(VirtualMachine.name)))
        vms = [vm for vm in placed if vm.desired_state != "deleted"]
        plan, failed = plan_destinations(session, ctx, server, vms)
        moved = move_placement_of_domainless(session, vms, plan)
    return {"plan": plan, "failed": failed, "total": len(vms), "moved": moved,
            "left": {vm.name: "being deleted" for vm in placed if vm.desired_state == "deleted"}}


def move_placement_of_domainless(session: Session, vms: list[VirtualMachine], plan: dict[str, str]) -> dict[str, str]:
    """A VM with no domain (its server's libvirt last said `undefined`) has nothing to migrate: its
    placement moves to its planned server, and it leaves the plan."""
    moved = {}
    for vm in vms:
        if vm.state == "undefined" and vm.name in plan:
            vm.server_id = session.scalar(select(ClusterServer.id).where(ClusterServer.name == plan[vm.name]))
            moved[vm.name] = plan.pop(vm.name)
    return moved


def plan_destinations(session: Session, ctx: JobContext, server: ClusterServer, vms: list[VirtualMachine],
                      order: Callable[[VirtualMachine], Any] = lambda v: (-v.memory_bytes, v.name),
                      ) -> tuple[dict[str, str], dict[str, str]]:
    """A destination for each VM in `order` (biggest first unless told), counting the VMs planned before it
    (they move at the same time, so placement alone would not see them); {vm: server} and {vm: why none fits}."""
    # Only servers of its own hypervisor kind can take a VM (its domain type moves with it).
    others = list(session.scalars(select(ClusterServer).where(ClusterServer.cluster_id == server.cluster_id,
                                                              ClusterServer.id != server.id,
                                                              ClusterServer.hypervisor == server.hypervisor)))
    taken = {other.name: (0, 0) for other in others}
    planned, failed = {}, {}
    for vm in sorted(vms, key=order):
        left = {other.name: _room_left(session, ctx, other, vm, taken[other.name]) for other in others}
        fitting = [o for o in others if left[o.name][0] >= vm.memory_bytes and left[o.name][1] >= vm.vcpus]
        try:
            bridged = on_network(session, ctx.rt.config, vm, others)
            dest = place(session, ctx.rt.config, [o for o in fitting if o in bridged], vm.memory_bytes, vm.vcpus,
                         exclude_vm=vm.id)
        except NoVmNetwork as error:
            failed[vm.name] = error.message
            continue
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
    """One migrate child per planned VM, EVACUATE_AT_ONCE at a time; {vm: new server} and {vm: why not}
    once all have ended. While some run, the job waits for the next to end without holding a worker."""
    started = {vm: ctx.once(f"migrate {vm}", lambda vm=vm: _start_migration(ctx, vm, plan[vm]))
               for vm in _next_batch(ctx, plan)}
    children = ctx.children([outcome["job"] for outcome in started.values() if "job" in outcome])
    running = [job.id for job in children if job.state not in FINAL_STATES]
    if running or len(started) < len(plan):
        ended = len(started) - len(running) + total - len(plan)
        ctx.wait_for_any(running, MIGRATE_TIMEOUT_S, 2, 99, done=ended, total=total)
        return _migrate_all(ctx, plan, total)
    by_id = {job.id: job for job in children}
    moved, failed = {}, {}
    for vm, outcome in started.items():
        job = by_id.get(outcome.get("job"))
        if job is None:
            failed[vm] = outcome["busy"]
        elif job.state == SUCCEEDED:
            moved[vm] = job.result.get("destination")
        else:
            failed[vm] = job.error_message or job.state
    return moved, failed


def _next_batch(ctx: JobContext, plan: dict[str, str]) -> list[str]:
    """The VMs whose migration has started, plus the next ones while fewer than EVACUATE_AT_ONCE run."""
    memo = ctx.continuation.get("memo", {})
    begun = [vm for vm in plan if f"migrate {vm}" in memo]
    children = ctx.children([memo[f"migrate {vm}"]["job"] for vm in begun if "job" in memo[f"migrate {vm}"]])
    running = sum(job.state not in FINAL_STATES for job in children)
    waiting = [vm for vm in plan if vm not in begun]
    return begun + waiting[:max(EVACUATE_AT_ONCE - running, 0)]


def _start_migration(ctx: JobContext, vm: str, destination: str) -> dict[str, str]:
    try:
        return {"job": ctx.spawn("migrate", {"vm": vm, "to": destination, "live": True}, step=f"evacuate {vm}")}
    except TargetBusy as error:
        return {"busy": f"busy with job {error.extra['job_id']}"}
