"""Choosing a cluster server for a VM: enough allocatable memory and vCPUs, not in maintenance, a bridge on
the VM's network."""

from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from config import Config, parse_size
from errors import NoCapacity
from models import ClusterServer, VirtualMachine
from tasks.inventory.vmnet import on_network


@dataclass(frozen=True)
class Capacity:
    server: str
    memory_bytes: int
    vcpus: int

    def fits(self, memory_bytes: int, vcpus: int) -> bool:
        return memory_bytes <= self.memory_bytes and vcpus <= self.vcpus


def capacity(session: Session, config: Config, server: ClusterServer, *, exclude_vm: int | None = None) -> Capacity:
    """What `server` can still take, from its last facts and the VMs the DB places on it."""
    settings = config.section("placement")
    placed = select(func.coalesce(func.sum(VirtualMachine.memory_bytes), 0), func.coalesce(func.sum(VirtualMachine.vcpus), 0))
    placed = placed.where(VirtualMachine.server_id == server.id)
    if exclude_vm is not None:
        placed = placed.where(VirtualMachine.id != exclude_vm)
    # int(): PostgreSQL's SUM of a bigint is a numeric (Decimal), which does not mix with float.
    used_memory, used_vcpus = (int(value) for value in session.execute(placed).one())
    total = server.memory_total_bytes or 0
    ceiling = min(server.memory_limit_bytes or total, total) * float(settings["memory_overcommit"])
    free_now = (server.memory_free_bytes or 0) - parse_size(settings["memory_reserve"])
    memory = int(max(0, min(free_now, ceiling - used_memory)))
    vcpus = int(max(0, (server.cpu_count or 0) * float(settings["cpu_overcommit"]) - used_vcpus))
    return Capacity(server.name, memory, vcpus)


def lock_placement(session: Session) -> None:
    """Serialise placements: taken first in a transaction, this write lock (PostgreSQL row locks on the
    servers; SQLite's one writer) is held until its commit, so two installs cannot both count the same
    free room. Whatever the caller reads after it includes every placement committed before."""
    session.execute(update(ClusterServer).values(maintenance=ClusterServer.maintenance))


def place(session: Session, config: Config, candidates: list[ClusterServer], memory_bytes: int, vcpus: int,
          *, exclude_vm: int | None = None) -> ClusterServer:
    """The candidate with the most allocatable memory that fits; NoCapacity listing every server's numbers."""
    usable = [s for s in candidates if not s.maintenance and s.reachable is not False]
    room = {s.name: capacity(session, config, s, exclude_vm=exclude_vm) for s in usable}
    fitting = [s for s in usable if room[s.name].fits(memory_bytes, vcpus)]
    if not fitting:
        numbers = "; ".join(f"{name}: {c.memory_bytes // 2**20} MiB, {c.vcpus} vCPUs free" for name, c in room.items())
        raise NoCapacity(
            f"no server can take {memory_bytes // 2**20} MiB and {vcpus} vCPUs ({numbers or 'no usable server'})",
            memory_bytes=memory_bytes, vcpus=vcpus,
            servers={name: {"memory_bytes": c.memory_bytes, "vcpus": c.vcpus} for name, c in room.items()},
        )
    return max(fitting, key=lambda s: room[s.name].memory_bytes)


def place_vm(session: Session, config: Config, vm: VirtualMachine, asked: str | None) -> ClusterServer:
    """Choose `vm`'s server (the one asked for if it has room, else the roomiest of its cluster that bridges the
    VM's network) and record it on the VM; under lock_placement, taken first in the same transaction."""
    query = select(ClusterServer).where(ClusterServer.cluster_id == vm.cluster_id)
    if asked:
        query = select(ClusterServer).where(ClusterServer.name == asked)
    candidates = on_network(session, config, vm, list(session.scalars(query)))
    server = place(session, config, candidates, vm.memory_bytes, vm.vcpus, exclude_vm=vm.id)
    vm.server_id = server.id
    return server
