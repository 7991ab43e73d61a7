"""A server's facts, read on its own node queue through libvirt, and its hypervisor kind."""

from typing import Any

from sqlalchemy import select

from errors import LaxError
from models import ClusterServer, utcnow
from tasks.context import JobContext
from tasks.inventory.config_sync import CONFIGURED
from tasks.workflow import workflow
from workers.node import probe
from workers.node.host import read_facts


@workflow("refresh-server")
def refresh_server(ctx: JobContext) -> dict[str, Any]:
    """Read this server's facts through libvirt, and its hypervisor kind (from the config, else a probe
    domain), and store them on its row."""
    name = ctx.params.server
    with ctx.session() as session:
        uri = session.scalar(select(ClusterServer.libvirt_uri).where(ClusterServer.name == name))
    ctx.phase("read facts", progress=10)
    try:
        facts = read_facts(uri)
        ctx.phase("hypervisor kind", progress=40)
        kind = hypervisor_kind(ctx, name, uri)
    except LaxError:
        _mark_reachable(ctx, name, False)
        raise
    ctx.phase("store facts", progress=90)
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
        for field, value in facts.as_dict().items():
            setattr(server, field, value)
        server.hypervisor, server.hypervisor_evidence = kind.kind, kind.evidence
        server.reachable, server.facts_updated_at = True, utcnow()
    return {**facts.as_dict(), "hypervisor": kind.kind, "hypervisor_evidence": kind.evidence}


def hypervisor_kind(ctx: JobContext, name: str, uri: str) -> probe.Detected:
    """The kind the config sets for this server, else what a probe domain finds."""
    configured = next((server.hypervisor for _, _, server in ctx.rt.config.servers() if server.name == name), None)
    if configured is not None:
        return probe.Detected(configured, CONFIGURED)
    return probe.detect(uri)


def _mark_reachable(ctx: JobContext, name: str, reachable: bool) -> None:
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
        server.reachable = reachable
