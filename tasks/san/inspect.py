"""`laxcluster check` on a SAN's queue: what the SAN holds (inspect-san), and the safe repairs (repair-san).

A repair checks again, on the SAN and in the inventory, that what it deletes is still unowned and
unexported: the check's report may be minutes old, and a job may have claimed the thing since.
"""

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import SanConfig
from errors import Conflict, LaxError
from models import San, Template, VirtualMachine, Volume
from models.protection import Backup
from tasks.context import JobContext
from tasks.san.storage import target_for
from tasks.san.volumes import SanPlace, restore_exports, san_place
from tasks.workflow import workflow
from workers.node import domains
from workers.node.host import answers_tcp


@workflow("inspect-san")
def inspect_san(ctx: JobContext) -> dict[str, Any]:
    """The backend's volumes and snapshots (handle -> backing path) and tgtd's targets with LUNs, ACLs, sessions."""
    place = san_place(ctx.rt.config, ctx.params.san)
    ctx.phase("list volumes", progress=10)
    volumes = place.backend.listing()
    ctx.phase("list targets", progress=60)
    targets = [{"iqn": t.iqn, "luns": {str(lun): path for lun, path in t.luns.items()},
                "initiators": list(t.initiators), "sessions": t.sessions}
               for t in target_for(place.san).list_targets()]
    return {"volumes": volumes, "targets": targets, "host": _host(place.san)}


def _host(san: SanConfig) -> dict[str, Any] | None:
    """The domains of the SAN host's libvirt (VMs run there for maintenance), or why it did not answer."""
    if not san.uri:
        return None
    if not answers_tcp(san.uri):
        return {"error": f"nothing answers at {san.uri}"}
    try:
        return {"domains": domains.listing(san.uri)}
    except LaxError as error:
        return {"error": f"{error.code}: {error.message}"}


@workflow("repair-san")
def repair_san(ctx: JobContext) -> dict[str, Any]:
    """Run each repair action; one that is refused or fails does not stop the others."""
    place = san_place(ctx.rt.config, ctx.params.san)
    outcomes = []
    for number, action in enumerate(ctx.params.actions):
        ctx.phase(f"{action.op} {action.what}", progress=100 * number / len(ctx.params.actions))
        outcomes.append(_outcome(ctx, place, action.op, action.what))
    return {"actions": outcomes}


def _outcome(ctx: JobContext, place: SanPlace, op: str, what: str) -> dict[str, Any]:
    try:
        return {"op": op, "what": what, "done": True, "detail": REPAIRS[op](ctx, place, what)}
    except LaxError as error:
        return {"op": op, "what": what, "done": False, "detail": f"{error.code}: {error.message}"}


def _delete_target(ctx: JobContext, place: SanPlace, iqn: str) -> str:
    with ctx.session() as session:
        if session.scalar(select(Volume.id).where(Volume.iscsi_target == iqn).limit(1)) is not None:
            raise Conflict(f"a volume row is exported as {iqn} now")
    target_for(place.san).unexport(iqn)  # refuses (IscsiTargetBusy) while an initiator is logged in
    return f"deleted target {iqn}"


def _delete_volume(ctx: JobContext, place: SanPlace, handle: str) -> str:
    _refuse_if_in_use(ctx, place, handle)
    place.backend.delete(handle)
    return f"deleted volume {handle}"


def _delete_snapshot(ctx: JobContext, place: SanPlace, handle: str) -> str:
    _refuse_if_in_use(ctx, place, handle)
    place.backend.delete_snapshot(handle)
    return f"deleted snapshot {handle}"


def _refuse_if_in_use(ctx: JobContext, place: SanPlace, handle: str) -> None:
    """Conflict if a row owns `handle` now, tgtd exports it, or it carries the UUID of an existing VM
    (an install that has made the volume but not yet its row)."""
    path = place.backend.listing().get(handle)
    if path is None:
        return
    with ctx.session() as session:
        owner = _owner(session, place.san.name, handle)
    if owner:
        raise Conflict(f"{handle} belongs to {owner} now")
    if any(path in target.luns.values() for target in target_for(place.san).list_targets()):
        raise Conflict(f"{handle} is exported now")


def _owner(session: Session, san: str, handle: str) -> str | None:
    san_id = session.scalar(select(San.id).where(San.name == san))
    if session.scalar(select(Volume.id).where(Volume.san_id == san_id, Volume.backend_handle == handle)):
        return "a volume row"
    if session.scalar(select(Template.name).where(Template.san_id == san_id, Template.backend_handle == handle)):
        return "a template"
    if session.scalar(select(Backup.id).where(Backup.san_name == san, Backup.snapshot == handle).limit(1)):
        return "a backup"
    uuids = session.scalars(select(VirtualMachine.uuid))
    return next((f"VM {uuid}" for uuid in uuids if uuid in handle), None)


def _restore_exports(_: JobContext, place: SanPlace, __: str) -> str:
    changes = restore_exports(place.san.name)
    return "; ".join(changes) or "exports already as the inventory says"


REPAIRS: dict[str, Callable[[JobContext, SanPlace, str], str]] = {
    "delete-target": _delete_target,
    "delete-volume": _delete_volume,
    "delete-snapshot": _delete_snapshot,
    "restore-exports": _restore_exports,
}
