"""Server workflows: refreshing every cluster server's facts through its own node queue, and re-admitting a
server after maintenance or a fence."""

from typing import Any

from sqlalchemy import select

from errors import ActivateFailed, RefreshFailed, ServerNotFound, TargetBusy
from models import SUCCEEDED, ClusterServer, Job
from tasks.context import JobContext
from tasks.node.heartbeat import silence_key
from tasks.san.storage import san_of_site
from tasks.workflow import workflow

REFRESH_TIMEOUT_S = 120
ACTIVATE_STEP_TIMEOUT_S = 300


@workflow("refresh-servers")
def refresh_servers(ctx: JobContext) -> dict[str, Any]:
    """Fan out one refresh-server child job per server, on that server's queue, and wait for all."""
    ctx.phase("dispatch", progress=0)
    spawned = ctx.once("children", lambda: _spawn_refreshes(ctx))
    children = spawned["children"]
    ctx.phase("refresh", progress=5)
    finished = ctx.wait_for_children(list(children.values()), REFRESH_TIMEOUT_S, start=5, end=100)
    by_id = {job.id: job for job in finished}
    outcome = {name: by_id[job_id].state for name, job_id in children.items()}
    failed = [name for name, state in outcome.items() if state != SUCCEEDED]
    if failed:
        raise RefreshFailed(f"could not refresh: {', '.join(failed)}", servers=outcome)
    return {"servers": outcome, "skipped_busy": spawned["busy"]}


def _spawn_refreshes(ctx: JobContext) -> dict[str, Any]:
    with ctx.session() as session:
        names = list(session.scalars(select(ClusterServer.name).order_by(ClusterServer.name)))
    children, busy = {}, []
    for name in names:
        try:
            children[name] = ctx.spawn("refresh-server", {"server": name})
        except TargetBusy as error:
            busy.append({"server": name, "job_id": error.extra["job_id"]})
    return {"children": children, "busy": busy}


@workflow("activate-server")
def activate_server(ctx: JobContext) -> dict[str, Any]:
    """End a server's maintenance. A fenced server first loses its stale domains (on its own queue: its
    libvirtd must answer), is then re-admitted and let back into its site's target ACLs."""
    name = ctx.params.server
    ctx.phase("look", progress=2)
    site = ctx.once("fenced site", lambda: _fenced_site(ctx, name))
    if site is None:
        _readmit(ctx, name)
        return {"server": name, "was_fenced": False}
    ctx.phase("remove stale domains", progress=5)
    cleared = _run_child(ctx, "remove-stale-domains", {"server": name}, 5, 60)
    ctx.phase("re-admit", progress=60)
    _readmit(ctx, name)
    ctx.phase("restore exports", progress=70)
    san = san_of_site(ctx.rt.config, site).name
    restored = _run_child(ctx, "repair-san", {"san": san, "actions": [{"op": "restore-exports", "what": san}]}, 70, 100)
    [outcome] = restored.result["actions"]
    if not outcome["done"]:
        raise ActivateFailed(f"{name} is re-admitted, but {san} could not restore its exports: {outcome['detail']}",
                             server=name)
    return {"server": name, "was_fenced": True, "undefined": cleared.result["undefined"],
            "stopped": cleared.result["stopped"], "exports": outcome["detail"]}


def _fenced_site(ctx: JobContext, name: str) -> str | None:
    """The site of the server if it is fenced, None if it is not."""
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
        if server is None:
            raise ServerNotFound(f"no cluster server {name}", server=name)
        return server.cluster.site.name if server.fenced_at is not None else None


def _run_child(ctx: JobContext, kind: str, params: dict[str, Any], start: float, end: float) -> Job:
    [child] = ctx.wait_for_children([ctx.spawn(kind, params)], ACTIVATE_STEP_TIMEOUT_S, start, end)
    if child.state != SUCCEEDED:
        raise ActivateFailed(f"{ctx.params.server} stays out: {kind} ended {child.state}: {child.error_message}",
                             server=ctx.params.server, job_id=child.id)
    return child


def _readmit(ctx: JobContext, name: str) -> None:
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
        server.fenced_at, server.maintenance = None, False
    # The watcher skips fenced servers, so it still remembers the silence that got this one fenced: a
    # failure right after the activation would otherwise be declared at once, without its grace.
    ctx.rt.redis.delete(silence_key(name))
