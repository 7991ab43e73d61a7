"""`evacuate`: put a server into maintenance and move every VM on it elsewhere, as migrate jobs."""

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from errors import EvacuationIncomplete, NoCapacity, ServerNotFound, TargetBusy
from models import FINAL_STATES, SUCCEEDED, ClusterServer, VirtualMachine
from tasks.context import JobContext
from tasks.control.migrate import _record, vm_target
from tasks.inventory.placement import capacity, place
from tasks.queues import CONTROL
from tasks.workflow import workflow

POLL_S = 0.5
EVACUATE_AT_ONCE = 2


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
            except TargetBusy as error:
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
