"""A server's facts, read on its own node queue through libvirt."""

from typing import Any

from sqlalchemy import select

from errors import LaxError
from models import ClusterServer, utcnow
from tasks.context import JobContext
from tasks.workflow import workflow
from workers.node.host import read_facts


@workflow("refresh-server")
def refresh_server(ctx: JobContext) -> dict[str, Any]:
    """Read this server's facts through libvirt and store them on its row."""
    name = ctx.params.server
    with ctx.session() as session:
        uri = session.scalar(select(ClusterServer.libvirt_uri).where(ClusterServer.name == name))
    ctx.phase("read facts", progress=10)
    try:
        facts = read_facts(uri)
    except LaxError:
        _mark_reachable(ctx, name, False)
        raise
    ctx.phase("store facts", progress=90)
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
        for field, value in facts.as_dict().items():
            setattr(server, field, value)
        server.reachable, server.facts_updated_at = True, utcnow()
    return facts.as_dict()


def _mark_reachable(ctx: JobContext, name: str, reachable: bool) -> None:
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
        server.reachable = reachable
