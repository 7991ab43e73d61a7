"""The HTTP face of cluster servers: their facts, the job that refreshes them, evacuate, fence and activate."""

from flask import Blueprint, jsonify
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from api import context, validation
from api.changes import submit_job
from api.openapi import list_of, operation, ref
from api.representations import server_json
from errors import ServerNotFound
from models import Cluster, ClusterServer

blueprint = Blueprint("servers", __name__)
REFRESH_TARGET = "servers"


def _servers():
    return select(ClusterServer).options(joinedload(ClusterServer.cluster).joinedload(Cluster.site)).order_by(ClusterServer.name)


@blueprint.get("/servers")
@operation("List cluster servers with their last known facts (memory in bytes, CPU in MHz)", response=list_of("Server"))
def index():
    with context.session() as db:
        return jsonify(items=[server_json(server) for server in db.scalars(_servers())])


@blueprint.get("/servers/<name>")
@operation("Show one cluster server", response=ref("Server"))
def show(name: str):
    validation.name(name, "name")
    with context.session() as db:
        server = db.scalar(_servers().where(ClusterServer.name == name))
        if server is None:
            raise ServerNotFound(f"no cluster server {name}", name=name)
        return jsonify(server_json(server))


@blueprint.post("/servers/refresh")
@operation("Refresh every server's facts through libvirt, one child job per server", status=202, response=ref("Job"))
def refresh():
    validation.reject_unknown(validation.json_body(), set())
    return submit_job("refresh-servers")


@blueprint.post("/servers/<name>/actions/evacuate")
@operation("Put a server into maintenance (no new VMs) and migrate every VM on it elsewhere, as a job",
           status=202, response=ref("Job"))
def evacuate(name: str):
    return _server_job("evacuate", name)


@blueprint.post("/servers/<name>/actions/activate")
@operation("End a server's maintenance, as a job: placement and migrations may use it again. A fenced server "
           "first loses its stale domains, then is let back into its site's target ACLs", status=202, response=ref("Job"))
def activate(name: str):
    return _server_job("activate-server", name)


@blueprint.post("/servers/<name>/actions/fence")
@operation("Fence a server at its site's SAN, as a job: its initiator leaves every target ACL and its sessions are "
           "dropped, so nothing on it can write a VM disk; it stays in maintenance until activated",
           status=202, response=ref("Job"))
def fence(name: str):
    return _server_job("fence-server", name)


def _server_job(kind: str, name: str):
    validation.reject_unknown(validation.json_body(), set())
    with context.session() as db:
        _existing_server(db, name)
    return submit_job(kind, {"server": name})


def _existing_server(db: Session, name: str) -> ClusterServer:
    validation.name(name, "name")
    server = db.scalar(_servers().where(ClusterServer.name == name))
    if server is None:
        raise ServerNotFound(f"no cluster server {name}", name=name)
    return server
