"""`fence-server`: lock a cluster server out of its site's SAN, so no VM disk of the site can be written
from it any more, whatever still runs there (its QEMUs may outlive its libvirtd and node worker).

The server is marked fenced in the inventory first: from then on every export of the site leaves its
initiator out of the ACLs, so a later export cannot let it back in. Then tgtd takes its initiator off
every ACL and drops its open sessions, and shows that it is gone. Fenced is the safe side: a failed
fence leaves the mark (the job fails; running it again finishes the fence). `server activate` ends it.
"""

from typing import Any

from sqlalchemy import select

from errors import ServerNotFound
from models import ClusterServer, utcnow
from tasks.context import JobContext
from tasks.san.storage import san_of_site, target_for
from tasks.workflow import workflow


@workflow("fence-server")
def fence_server(ctx: JobContext) -> dict[str, Any]:
    """Mark the server fenced (and in maintenance), then lock its initiator out of the site's targets."""
    ctx.phase("mark fenced", progress=10)
    initiator, site = _mark_fenced(ctx, ctx.params.server)
    ctx.phase("fence at the SAN", progress=40)
    san = san_of_site(ctx.rt.config, site)
    fenced = target_for(san).fence(initiator)
    # Sessions still open are the SAN's view of the server: something there was still using its disks.
    return {"server": ctx.params.server, "initiator": initiator, "san": san.name, "targets": fenced.targets,
            "sessions_dropped": fenced.sessions}


def _mark_fenced(ctx: JobContext, name: str) -> tuple[str, str]:
    with ctx.session() as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
        if server is None:
            raise ServerNotFound(f"no cluster server {name}", server=name)
        if server.fenced_at is None:
            server.fenced_at = utcnow()
        server.maintenance = True
        return server.initiator_iqn, server.cluster.site.name
