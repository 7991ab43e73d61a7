"""VM workflows on the control queue: install, power actions and delete, each fanning out to the
SAN (`san.<site>`) and the VM's server (`node.<server>`) as child jobs.

A workflow reads as its phases; its cleanup undoes them in reverse, so a failed or cancelled
install leaves no volume, target, lease, domain or VM row behind.
"""

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from errors import TargetBusy
from models import ClusterServer, Lease, Template, VirtualMachine, Volume
from tasks import jobs
from tasks.context import JobContext
from tasks.control.replicas import drop_replicas
from tasks.kinds import backup_lock
from tasks.inventory import ipam
from tasks.inventory.placement import lock_placement, place_vm
from tasks.inventory.vmnet import leased_subnets, publish_leases
from tasks.inventory.vms import MAINTENANCE, find_vm, placed_on, refuse_while_away, site_and_san, vm_volume
from tasks.kinds import san_of_vm
from tasks.san.maintenance import checked_for_san
from tasks.workflow import workflow

SAN_TIMEOUT_S = 600
NODE_TIMEOUT_S = 300
BACKUP_WAIT_S = 3600


# -- install ------------------------------------------------------------------------------------

def undo_install(ctx: JobContext) -> None:
    """Remove the domain, the disks and export, the lease and the VM row: whatever the install made."""
    remove_vm_everywhere(ctx, progress_from=0)
    subnets: list[str] = []
    with ctx.session() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == ctx.params.vm))
        if vm is not None:
            subnets = leased_subnets(session, vm.id)
            ipam.release(session, vm.id)
            session.delete(vm)
    publish_dhcp(ctx, subnets)


def publish_dhcp(ctx: JobContext, subnets: list[str]) -> None:
    """After a lease change has committed: the DHCP servers of those subnets' networks serve the DB's leases."""
    with ctx.session() as session:
        for subnet in subnets:
            publish_leases(session, ctx.rt.config, subnet)


def vm_left_in_error(ctx: JobContext) -> str | None:
    """A VM job failed with nothing undoing it: the VM goes to state `error`, wanted deleted (the reconciler
    retries `delete-vm` until it succeeds); say what of it is left."""
    with ctx.session() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == ctx.params.vm))
        if vm is None:
            return None
        vm.state, vm.desired_state = "error", "deleted"
        return describe_remains(session, vm)


def describe_remains(session: Session, vm: VirtualMachine) -> str:
    server = session.get(ClusterServer, vm.server_id).name if vm.server_id else None
    volumes = sorted(session.scalars(select(Volume.backend_handle).where(Volume.vm_id == vm.id)))
    leases = sorted(session.scalars(select(Lease.ip).where(Lease.vm_id == vm.id)))
    parts = [f"VM row {vm.name} (uuid {vm.uuid})"]
    parts += [f"a domain on {server}"] if server else []
    parts += [f"volumes {', '.join(volumes)}"] if volumes else [f"perhaps volumes vm-{vm.uuid}-*"]
    parts += [f"lease {', '.join(leases)}"] if leases else []
    return "; ".join(parts)


@workflow("install-vm", cleanup=undo_install, left_behind=vm_left_in_error)
def install_vm(ctx: JobContext) -> dict[str, Any]:
    """Place the reserved VM, prepare its disks on the SAN, define and start it on its server."""
    return place_prepare_and_start(ctx, ctx.params.vm)


@workflow("restore-vm", cleanup=undo_install, left_behind=vm_left_in_error)
def restore_vm(ctx: JobContext) -> dict[str, Any]:
    """A new VM from a backup: restore the backup to the reserved VM's disk, then install around that disk
    (its seed, export, domain) instead of cloning the template."""
    return restore_as_vm(ctx, ctx.params.vm, ctx.params.backup, progress_from=0) | {"backup": ctx.params.backup}


def restore_as_vm(ctx: JobContext, name: str, backup: str, progress_from: float) -> dict[str, Any]:
    """Restore `backup` onto the reserved VM `name`'s disk, then place, prepare and start it."""
    middle = progress_from + (100 - progress_from) / 2
    ctx.phase("restore disk", progress=progress_from)
    with ctx.session() as session:
        disk = vm_volume(find_vm(session, name), "disk")
    ctx.run_child("restore", {"backup": backup, "in_place": False, "as": disk},
                  timeout=SAN_TIMEOUT_S, start=progress_from, end=middle)
    return place_prepare_and_start(ctx, name, progress_from=middle)


@workflow("verify-boot", cleanup=undo_install, left_behind=vm_left_in_error)
def verify_boot(ctx: JobContext) -> dict[str, Any]:
    """Verify a backup's chunks, restore it as the reserved scratch VM, boot it, report whether it came up,
    and remove the scratch VM again."""
    name, backup = ctx.params.vm, ctx.params.backup
    ctx.phase("verify chunks", progress=1)
    ctx.run_child("verify-backup", {"backup": backup}, timeout=SAN_TIMEOUT_S, start=1, end=30)
    started = restore_as_vm(ctx, name, backup, progress_from=30)
    ctx.phase("wait for the guest", progress=85)
    probe = ctx.run_child("probe-boot", {"vm": name, "server": started["server"]}, timeout=NODE_TIMEOUT_S, start=85, end=95)
    ctx.report.update(phase="remove scratch VM", progress=95)
    undo_install(ctx)
    return {"backup": backup, "vm": name, "verified": True, **probe}


def place_prepare_and_start(ctx: JobContext, name: str, progress_from: float = 0) -> dict[str, Any]:
    """The install's phases for a reserved VM; a disk already on the SAN (a restore) is kept, not cloned."""
    span = (100 - progress_from) / 100

    def at(percent: float) -> float:
        return progress_from + percent * span

    ctx.phase("place", progress=at(2))
    server_name = choose_server(ctx, name, ctx.params.server)
    with ctx.session() as session:
        vm = find_vm(session, name)
        template_size = session.get(Template, vm.template_id).default_size_bytes
        subnets = leased_subnets(session, vm.id)
    ctx.phase("publish lease", progress=at(5))
    publish_dhcp(ctx, subnets)
    ctx.phase("prepare disks", progress=at(10))
    disk_bytes = ctx.params.disk_bytes or template_size
    disks = ctx.run_child("prepare-vm-disks", {"vm": name, "disk_bytes": disk_bytes}, timeout=SAN_TIMEOUT_S,
                          start=at(10), end=at(60))
    ctx.phase("define and start", progress=at(60))
    started = ctx.run_child("start-domain", {"vm": name, "server": server_name}, timeout=NODE_TIMEOUT_S,
                            start=at(60), end=at(98))
    return {"vm": name, "server": server_name, "target": disks["target"], "state": started["state"]}


def choose_server(ctx: JobContext, name: str, asked: str | None) -> str:
    """Pick (and record on the VM) the server: the one asked for if it has room, else the roomiest.
    Chosen once: a later run of the job (after a wait) keeps the server its disks were made for."""
    return ctx.once("server", lambda: _place(ctx, name, asked))


def _place(ctx: JobContext, name: str, asked: str | None) -> str:
    with ctx.session() as session:
        lock_placement(session)
        return place_vm(session, ctx.rt.config, find_vm(session, name), asked).name


# -- power actions and delete ----------------------------------------------------------------------

@workflow("start")
def start_vm(ctx: JobContext) -> dict[str, Any]:
    """Start a VM on its server, re-creating its LUNs first so a grown disk shows its new size; with `on_san`,
    on its SAN host instead, its exports locked (maintenance)."""
    name = ctx.params.vm
    if ctx.params.on_san:
        # Checked once: a re-run after a crash finds the VM in the maintenance state this job put it in.
        san = ctx.once("san", lambda: _checked_for_san(ctx, name))
        ctx.phase("start on the SAN host", progress=10)
        return ctx.run_child("start-on-san", {"vm": name, "san": san}, timeout=SAN_TIMEOUT_S, start=10, end=98)
    with ctx.session() as session:
        vm = find_vm(session, name)
        refuse_while_away(vm)
        server, generation = placed_on(session, vm), vm.generation
    ctx.phase("refresh LUNs", progress=10)
    ctx.run_child("refresh-luns", {"vm": name}, timeout=SAN_TIMEOUT_S, start=10, end=30)
    ctx.phase("start", progress=30)
    return ctx.run_child("start-domain", {"vm": name, "server": server, "generation": generation},
                         timeout=NODE_TIMEOUT_S, start=30, end=98)


def _checked_for_san(ctx: JobContext, name: str) -> str:
    with ctx.session() as session:
        return checked_for_san(session, ctx.rt.config, find_vm(session, name))


def _power(action: str):
    def run(ctx: JobContext) -> dict[str, Any]:
        name = ctx.params.vm
        # Decided once: a re-run after the SAN host's child ended the maintenance must not turn to the server.
        where = ctx.once("where", lambda: _runs_where(ctx, name))
        ctx.phase(action, progress=5)
        params = {"vm": name, "action": action, **where}
        if ctx.params.timeout_s is not None:
            params["timeout_s"] = ctx.params.timeout_s
        kind = "power-on-san" if "san" in where else "power-domain"
        return ctx.run_child(kind, params, timeout=NODE_TIMEOUT_S, start=5, end=98)

    run.__doc__ = f"{action.capitalize()} a VM on its server (or on its SAN host, in maintenance)."
    return run


def _runs_where(ctx: JobContext, name: str) -> dict[str, str]:
    on_san = _maintenance_san(ctx)
    if on_san:
        return {"san": on_san}
    with ctx.session() as session:
        return {"server": placed_on(session, find_vm(session, name))}


for _action in ("shutdown", "reboot", "destroy"):
    workflow(_action)(_power(_action))


@workflow("delete-vm", left_behind=vm_left_in_error)
def delete_vm(ctx: JobContext) -> dict[str, Any]:
    """Stop and undefine the domain, unexport and delete the volumes and backup anchors, release the lease,
    drop the VM: in whatever state it is, removing whatever of it exists."""
    on_san = ctx.once("on san", lambda: _maintenance_san(ctx))
    if on_san:
        ctx.phase("stop on the SAN host", progress=2)
        ctx.run_child("power-on-san", {"vm": ctx.params.vm, "san": on_san, "action": "destroy"}, timeout=SAN_TIMEOUT_S,
                      start=2, end=5)
    with ctx.session() as session:
        vm = find_vm(session, ctx.params.vm)
        vm.state, vm.desired_state = "deleting", "deleted"
        backup = jobs.holder_of(session, backup_lock(vm.name))
    if backup is not None:
        # Marked `deleting` first: a backup starting after this refuses the VM, one running now is awaited.
        ctx.report.update(phase=f"wait for backup job {backup}")
        if not ctx.wait_for_other_job(backup, BACKUP_WAIT_S):
            raise TargetBusy(f"backup job {backup} of {ctx.params.vm} did not end", job_id=backup)
    ctx.report.update(phase="drop replicas", progress=5)
    drop_replicas(ctx, 5, 10)
    undo_install(ctx)
    return {"deleted": ctx.params.vm}


def _maintenance_san(ctx: JobContext) -> str | None:
    """The SAN whose host runs the VM for maintenance, if it does."""
    with ctx.session() as session:
        return san_of_vm(session, ctx.params) if find_vm(session, ctx.params.vm).state == MAINTENANCE else None


def remove_vm_everywhere(ctx: JobContext, progress_from: float) -> None:
    """Undefine the VM's domain on its server and remove its disks on the SAN (each idempotent)."""
    name = ctx.params.vm
    with ctx.session() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == name))
        if vm is None:
            return
        server = session.get(ClusterServer, vm.server_id).name if vm.server_id else None
        _, san = site_and_san(session, vm)
    # Cleanup reports without ctx.phase: that checks for cancel, and undoing must not be cancelled.
    if server:
        ctx.report.update(phase="remove domain", progress=progress_from)
        ctx.run_child("remove-domain", {"vm": name, "server": server}, timeout=NODE_TIMEOUT_S, start=progress_from,
                      end=50, cancellable=False)
    ctx.report.update(phase="remove disks", progress=50)
    ctx.run_child("remove-vm-disks", {"vm": name, "san": san}, timeout=SAN_TIMEOUT_S, start=50, end=95,
                  cancellable=False)
