"""Dropping a VM's replication leftovers on both SANs: its point snapshots, and a replica copy no row owns."""

from sqlalchemy import select

from models import San, VirtualMachine
from models.protection import Replication
from errors import Conflict
from tasks import jobs
from tasks.context import JobContext, raise_unless_succeeded
from tasks.inventory.dr import primary_san

SAN_TIMEOUT_S = 600
SHIP_WAIT_S = 1800


def drop_replicas(ctx: JobContext, start: float, end: float) -> list[str]:
    """Pause the VM's replication, let a ship under way end, then run drop-replica-points on the VM's SAN and its
    peer (nothing if the VM is not replicated); return the SANs."""
    with ctx.session() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == ctx.params.vm))
        rep = session.scalar(select(Replication).where(Replication.vm_id == vm.id)) if vm is not None else None
        if rep is None:
            return []
        rep.enabled = False
    wait_for_ship(ctx)
    with ctx.session() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == ctx.params.vm))
        rep = session.scalar(select(Replication).where(Replication.vm_id == vm.id))
        home = primary_san(session, vm)
        sans = sorted({san.name for san in (home, session.get(San, rep.peer_san_id)) if san is not None})
    children = [ctx.spawn("drop-replica-points", {"vm": ctx.params.vm, "san": san}) for san in sans]
    for child in ctx.wait_for_children(children, SAN_TIMEOUT_S, start, end, cancellable=False):
        raise_unless_succeeded(child)
    return sans


def wait_for_ship(ctx: JobContext) -> None:
    """A ship started before the pause ends first (the final sync and the promotion need its lock and its point)."""
    with ctx.session() as session:
        ship = jobs.holder_of(session, f"replicate/{ctx.params.vm}")
    if ship is not None and ship not in ctx.children_of_kind("replicate-to-dr"):
        ctx.report.update(phase=f"wait for replication job {ship}")
        if not ctx.wait_for_other_job(ship, SHIP_WAIT_S):
            raise Conflict(f"replication job {ship} of {ctx.params.vm} did not end", job_id=ship)
