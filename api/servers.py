"""The HTTP face of cluster servers: their facts, the job that refreshes them, evacuate and activate."""

from flask import Blueprint, jsonify
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from api import context, validation
from api.changes import audit, submit_job
from api.openapi import list_of, operation, ref
from api.representations import server_json
from errors import ServerNotFound, TargetBusy
from models import Cluster, ClusterServer
from tasks import jobs
from tasks.kinds import server_lock

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
    validation.reject_unknown(validation.json_body(), set())
    with context.session() as db:
        _existing_server(db, name)
    return submit_job("evacuate", {"server": name})


@blueprint.post("/servers/<name>/actions/activate")
@operation("End a server's maintenance: placement and migrations may use it again", response=ref("Server"))
def activate(name: str):
    validation.reject_unknown(validation.json_body(), set())
    with context.session() as db:
        server = _existing_server(db, name)
        holder = jobs.holder_of(db, server_lock(name))
        if holder is not None:
            raise TargetBusy(f"server/{name} is busy with job {holder}", job_id=holder, target=server_lock(name))
        server.maintenance = False
        audit(db, "server.activate", server_lock(name))
        return jsonify(server_json(server))


def _existing_server(db: Session, name: str) -> ClusterServer:
    validation.name(name, "name")
    server = db.scalar(_servers().where(ClusterServer.name == name))
    if server is None:
        raise ServerNotFound(f"no cluster server {name}", name=name)
    return server
