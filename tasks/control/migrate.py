"""Moving VMs between cluster servers: `migrate` (one VM, live by default) and `evacuate` (every VM off
a server that goes into maintenance).

migrate, on the control queue, reads as its phases: pre-flight (every problem at once, nothing
changed: the inventory's checks here, libvirt's in a `preflight-migration` child on the SOURCE
server's queue), export storage (the VM's iSCSI target lets the destination's initiator in), migrate
(a `migrate-domain` child on the SOURCE server's queue holds the libvirt job), confirm. Whatever
happens, the VM ends running on exactly one server and the DB says which: the node child settles
both libvirts in its cleanup, the parent does so again in its own (a `settle-domain` child on the
same queue). The control worker itself never talks to a hypervisor.
"""

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Config
from errors import NoCapacity, NoVmNetwork, PreflightFailed, ServerNotFound
from models import ClusterServer, VirtualMachine
from tasks.context import JobContext, raise_unless_succeeded
from tasks.inventory.placement import capacity, place
from tasks.inventory.vmnet import missing_bridge, network_of, on_network
from tasks.inventory.vms import find_vm, placed_on, refuse_while_away, site_and_san
from tasks.workflow import workflow

MIGRATE_TIMEOUT_S = 1800
SAN_TIMEOUT_S = 300
NODE_TIMEOUT_S = 300

Problem = dict[str, str]  # {"code": ..., "message": ...}: one reason the move cannot go, with what to do


def settle_after_migrate(ctx: JobContext) -> None:
    """Wait for the node child to end, then make both libvirts and the DB agree on one server."""
    children = ctx.children_of_kind("migrate-domain")
    if not children:
        return  # nothing was moved yet: pre-flight and export change no libvirt
    ctx.wait_for_children(children, MIGRATE_TIMEOUT_S, cancellable=False)
    plan = ctx.recorded_result()
    ctx.run_child("settle-domain", {"vm": plan["vm"], "source": plan["source"], "destination": plan["destination"]},
                  timeout=NODE_TIMEOUT_S, start=98, end=100, cancellable=False)


@workflow("migrate", cleanup=settle_after_migrate, rerun_after_crash=False)
def migrate_vm(ctx: JobContext) -> dict[str, Any]:
    """Move a VM to another server (live when it runs); with `check`, only report what stands in the way."""
    name, live = ctx.params.vm, ctx.params.live
    ctx.phase("pre-flight", progress=2)
    source, destination, problems = preflight(ctx, name, ctx.params.to)
    plan = {"vm": name, "source": source, "destination": destination, "live": live}
    ctx.record_result({**plan, "problems": problems})
    if ctx.params.check:
        return {**plan, "problems": problems, "can_migrate": not problems}
    if problems:
        raise PreflightFailed(f"cannot migrate {name}: " + "; ".join(p["message"] for p in problems),
                              problems=problems)
    ctx.phase("export storage", progress=5)
    export_to(ctx, name, plan["destination"])
    ctx.phase("migrate", progress=10)
    child = ctx.spawn("migrate-domain", {**plan, "bandwidth_mib_s": ctx.params.bandwidth_mib_s})
    (job,) = ctx.wait_for_children([child], MIGRATE_TIMEOUT_S, start=10, end=98)
    raise_unless_succeeded(job)
    return {**plan, **job.result, "total_ms": ctx.elapsed_ms()}


def preflight(ctx: JobContext, name: str, asked: str | None) -> tuple[str, str, list[Problem]]:
    """The VM's server, the destination (asked, or chosen by placement) and every problem found: the
    inventory's here, libvirt's (and the destination's room) from a child job on the source server.
    The inventory is asked once: after the move a later run of the job would find the VM on its
    destination already."""
    checked = ctx.once("pre-flight", lambda: dict(zip(("source", "destination", "problems", "check"),
                                                      _inventory_problems(ctx, name, asked))))
    if checked["check"] is None:
        return checked["source"], checked["destination"], checked["problems"]
    found = ctx.run_child("preflight-migration", checked["check"], timeout=NODE_TIMEOUT_S, start=2, end=5)
    return checked["source"], checked["destination"], checked["problems"] + list(found["problems"])


def _inventory_problems(ctx: JobContext, name: str, asked: str | None
                        ) -> tuple[str, str, list[Problem], dict[str, Any] | None]:
    """What the inventory says of the move: source, destination, problems, and the `check` that asks
    the source server's libvirt the rest (None when the inventory already refuses)."""
    with ctx.session() as session:
        vm = find_vm(session, name)
        refuse_while_away(vm)
        source = session.scalar(select(ClusterServer).where(ClusterServer.name == placed_on(session, vm)))
        try:
            dest = _destination(session, ctx, vm, source, asked)
        except NoCapacity as error:
            return source.name, "", [_problem(error.code, f"{error.message}: free memory or add a server")], None
        except NoVmNetwork as error:
            return source.name, "", [_problem(error.code, error.message)], None
        if dest.id == source.id:
            return source.name, dest.name, [_problem("SameServer", f"{name} already runs on {dest.name}")], None
        if dest.cluster_id != source.cluster_id:
            return source.name, dest.name, [_problem(
                "OtherCluster", f"{dest.name} is not in {name}'s cluster, so it cannot reach its disks: "
                                "choose a server of the same cluster")], None
        if kind_problem := _hypervisor_problem(name, source, dest):
            return source.name, dest.name, [kind_problem], None
        problems = network_problems(session, ctx.rt.config, vm, dest)
        room = capacity(session, ctx.rt.config, dest, exclude_vm=vm.id)
        check = {"vm": name, "source": source.name, "destination": dest.name, "destination_uri": dest.libvirt_uri,
                 "destination_maintenance": dest.maintenance, "free_memory_bytes": room.memory_bytes,
                 "free_vcpus": room.vcpus, "memory_bytes": vm.memory_bytes, "vcpus": vm.vcpus}
    return source.name, dest.name, problems, check


def network_problems(session: Session, config: Config, vm: VirtualMachine, dest: ClusterServer) -> list[Problem]:
    """NoVmNetwork when the destination has no bridge on the VM's network (its NIC could not be attached)."""
    network = network_of(session, config, vm)
    if network is None or config.vm_bridge(dest.name, network.name) is not None:
        return []
    return [_problem(NoVmNetwork.code, missing_bridge(dest.name, network))]


def _hypervisor_problem(name: str, source: ClusterServer, dest: ClusterServer) -> Problem | None:
    """A domain keeps its type (kvm, qemu, xen) on a move, so both servers must be of one known kind."""
    unknown = [server.name for server in (source, dest) if server.hypervisor is None]
    if unknown:
        return _problem("HypervisorUnknown", f"the hypervisor kind of {' and '.join(unknown)} is not known yet: "
                                             "refresh the servers (laxcluster servers refresh)")
    if source.hypervisor != dest.hypervisor:
        return _problem("HypervisorMismatch", f"{dest.name} is a {dest.hypervisor} server, {name}'s server "
                                              f"{source.name} is {source.hypervisor}: a VM moves only between "
                                              f"servers of one kind: choose a {source.hypervisor} server")
    return None


def _problem(code: str, message: str) -> Problem:
    return {"code": code, "message": message}


def _destination(session: Session, ctx: JobContext, vm: VirtualMachine, source: ClusterServer,
                 asked: str | None) -> ClusterServer:
    if asked:
        dest = session.scalar(select(ClusterServer).where(ClusterServer.name == asked))
        if dest is None:
            raise ServerNotFound(f"no cluster server {asked}", server=asked)
        return dest
    others = select(ClusterServer).where(ClusterServer.cluster_id == source.cluster_id, ClusterServer.id != source.id,
                                         ClusterServer.hypervisor == source.hypervisor)
    candidates = on_network(session, ctx.rt.config, vm, list(session.scalars(others)))
    return place(session, ctx.rt.config, candidates, vm.memory_bytes, vm.vcpus, exclude_vm=vm.id)


def export_to(ctx: JobContext, name: str, server: str) -> None:
    """Make sure the VM's iSCSI target lets `server`'s initiator log in (a SAN child job)."""
    with ctx.session() as session:
        site, san = site_and_san(session, find_vm(session, name))
        initiator = session.scalar(select(ClusterServer.initiator_iqn).where(ClusterServer.name == server))
    ctx.run_child("export-vm-disks", {"vm": name, "san": san, "initiator": initiator}, timeout=SAN_TIMEOUT_S,
                  start=5, end=10)
