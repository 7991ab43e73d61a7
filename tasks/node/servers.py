"""A server's facts, read on its own node queue through libvirt, and its hypervisor kind; its stale domains
removed before it is re-admitted."""

from typing import Any

from sqlalchemy import select

from errors import LaxError
from models import ClusterServer, VirtualMachine, utcnow
from tasks.context import JobContext
from tasks.inventory.config_sync import CONFIGURED
from tasks.workflow import workflow
from workers.node import domains, probe
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


@workflow("remove-stale-domains")
def remove_stale_domains(ctx: JobContext) -> dict[str, Any]:
    """Before a server is re-admitted: destroy and undefine every domain whose VM the inventory now places
    on another server (restarted there while this one was away), and, if the server was fenced, stop the
    domains of its own VMs too (their disks were cut off under them). Domains of no VM are left to check."""
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == ctx.params.server))
        placed = dict(session.execute(select(VirtualMachine.uuid, VirtualMachine.server_id)).all())
        uri, server_id, fenced = server.libvirt_uri, server.id, server.fenced_at is not None
    ctx.phase("remove stale domains", progress=20)
    removed, stopped = [], []
    for state in domains.states(uri):
        if state.uuid not in placed:
            continue
        if placed[state.uuid] != server_id:
            domains.undefine(uri, state.uuid)
            removed.append(state.uuid)
        elif fenced and state.domain_id is not None:
            domains.destroy(uri, state.uuid)
            stopped.append(state.uuid)
    return {"server": ctx.params.server, "undefined": removed, "stopped": stopped}
