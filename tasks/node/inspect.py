"""`laxcluster check` on a server's queue: the domains its libvirt knows (inspect-node), and undefining the
stopped ones nobody owns (repair-node)."""

from typing import Any

from sqlalchemy import select

from errors import Conflict, InvalidInput, LaxError
from models import ClusterServer, VirtualMachine
from tasks.context import JobContext
from tasks.workflow import workflow
from workers.node import domains


def _uri(ctx: JobContext) -> tuple[int, str]:
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == ctx.params.server))
        return server.id, server.libvirt_uri


@workflow("inspect-node")
def inspect_node(ctx: JobContext) -> dict[str, Any]:
    """Every domain of this server: UUID, name, state."""
    _, uri = _uri(ctx)
    ctx.phase("list domains", progress=10)
    return {"domains": domains.listing(uri)}


@workflow("repair-node")
def repair_node(ctx: JobContext) -> dict[str, Any]:
    """Undefine the listed domains, each only if it is stopped and no VM row places it on this server now."""
    server_id, uri = _uri(ctx)
    outcomes = []
    for action in ctx.params.actions:
        try:
            if action.op != "undefine-domain":
                raise InvalidInput(f"a server repairs only by undefine-domain, not {action.op}", field="actions")
            outcomes.append({"op": action.op, "what": action.what, "done": True,
                             "detail": _undefine(ctx, server_id, uri, action.what)})
        except LaxError as error:
            outcomes.append({"op": action.op, "what": action.what, "done": False,
                             "detail": f"{error.code}: {error.message}"})
    return {"actions": outcomes}


def _undefine(ctx: JobContext, server_id: int, uri: str, uuid: str) -> str:
    with ctx.session() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.uuid == uuid))
    if vm is not None and vm.server_id in (server_id, None):
        raise Conflict(f"domain {uuid} belongs to VM {vm.name} here now")
    if not domains.undefine_inactive(uri, uuid):
        raise Conflict(f"domain {uuid} runs now")
    return f"undefined domain {uuid}"
