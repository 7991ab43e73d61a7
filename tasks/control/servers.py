"""Server workflows: refreshing every cluster server's facts through its own node queue."""

from typing import Any

from sqlalchemy import select

from errors import RefreshFailed, TargetBusy
from models import SUCCEEDED, ClusterServer
from tasks.context import JobContext
from tasks.workflow import workflow

REFRESH_TIMEOUT_S = 120


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
