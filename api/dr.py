"""The HTTP face of DR: a VM's replication to the other site (enable, status, stop), failover, failback, drill.

Enabling records the VM's Replication row and starts its first (full) ship in one transaction; beat's
dispatcher starts the later ones. Failover, failback and drill are jobs on the control queue.
"""

from typing import Any

from flask import Blueprint, jsonify
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import context, validation
from api.changes import submit_job
from api.openapi import operation, ref
from api.vms import vm_named
from errors import ReplicationExists
from models import VirtualMachine
from models.protection import Replication
from tasks.inventory import dr
from tasks.kinds import Drill, Failover, request_schema

blueprint = Blueprint("dr", __name__)

ENABLE_FIELDS = {"site", "mode", "schedule", "rpo_target_s", "bandwidth_limit", "keep"}
RPO_BOUNDS, KEEP_BOUNDS = (5, 7 * 86400), (1, 100)
BANDWIDTH_BOUNDS = (64 * 1024, 100 * 2**30)
DEFAULT_RPO_S, DEFAULT_KEEP = 60, 3
ENABLE_SCHEMA = {"type": "object", "properties": {
    "site": {"type": "string", "description": "the DR site (default: the only other site)"},
    "mode": {"type": "string", "enum": list(dr.MODES), "default": "continuous"},
    "schedule": {"type": "string", "description": "scheduled: a cron line (UTC)"},
    "rpo_target_s": {"type": "integer", "minimum": RPO_BOUNDS[0], "maximum": RPO_BOUNDS[1],
                     "default": DEFAULT_RPO_S, "description": "above this age of the newest replica the state is alert"},
    "bandwidth_limit": {"type": ["string", "integer"], "description": "bytes per second on the link, e.g. 20M"},
    "keep": {"type": "integer", "minimum": KEEP_BOUNDS[0], "maximum": KEEP_BOUNDS[1], "default": DEFAULT_KEEP,
             "description": "consistent replica points kept on the DR SAN"}}}
STATUS_SCHEMA = {"type": "object", "properties": {
    "vm": {"type": "string"}, "state": {"type": "string", "enum": ["initial", "ok", "alert", "paused"]},
    "primary_site": {"type": ["string", "null"]}, "peer_san": {"type": "string"}, "generation": {"type": "integer"},
    "newest_point": {"type": ["string", "null"]}, "newest_point_at": {"type": ["string", "null"]},
    "rpo_s": {"type": ["number", "null"]}, "rpo_target_s": {"type": "integer"}, "bytes_behind": {"type": "integer"},
    "rate_bytes_s": {"type": "integer"}, "points": {"type": "array"}}}


@blueprint.post("/vms/<name>/replication")
@operation("Replicate a VM's disks to the other site's SAN (continuous, or on a cron schedule), starting with a "
           "full ship as a job", status=202, response=ref("Job"), body=ENABLE_SCHEMA)
def enable(name: str):
    body = validation.json_body()
    validation.reject_unknown(body, ENABLE_FIELDS)
    fields = enable_fields(body)
    with context.session() as db:
        vm_named(db, validation.name(name, "name"))

    def record(db: Session) -> None:
        vm = vm_named(db, name)
        if db.scalar(select(Replication.id).where(Replication.vm_id == vm.id)) is not None:
            raise ReplicationExists(f"{name} is replicated already", vm=name)
        peer = dr.dr_san(db, vm, fields.pop("site"))
        db.add(Replication(vm_id=vm.id, peer_san_id=peer.id, **fields))
        db.flush()

    return submit_job("replicate-to-dr", {"vm": name}, prepare=record)


def enable_fields(body: dict[str, Any]) -> dict[str, Any]:
    mode = validation.choice(body.get("mode", "continuous"), "mode", dr.MODES)
    schedule = body.get("schedule")
    if schedule is not None and not isinstance(schedule, str):
        raise validation.invalid("schedule", "must be a cron line")
    dr.check_schedule(mode, schedule)
    limit = body.get("bandwidth_limit")
    return {"site": validation.name(body["site"], "site") if body.get("site") is not None else None,
            "mode": mode, "schedule": schedule,
            "rpo_target_s": validation.integer(body.get("rpo_target_s", DEFAULT_RPO_S), "rpo_target_s", *RPO_BOUNDS),
            "keep": validation.integer(body.get("keep", DEFAULT_KEEP), "keep", *KEEP_BOUNDS),
            "bandwidth_limit_bytes_s": None if limit is None else validation.size(limit, "bandwidth_limit",
                                                                                  *BANDWIDTH_BOUNDS)}


@blueprint.get("/vms/<name>/replication")
@operation("A VM's replication: newest consistent replica, its age (RPO) against the target, bytes behind, rate, "
           "the points the DR SAN holds", response=STATUS_SCHEMA)
def show(name: str):
    with context.session() as db:
        vm = vm_named(db, validation.name(name, "name"))
        return jsonify(dr.status(db, vm, dr.replication_of(db, vm)))


@blueprint.get("/replications")
@operation("Every replicated VM's status (what `laxcluster dr status` shows)",
           response={"type": "array", "items": STATUS_SCHEMA})
def index():
    with context.session() as db:
        rows = db.execute(select(Replication, VirtualMachine).join(VirtualMachine).order_by(VirtualMachine.name)).all()
        return jsonify([dr.status(db, vm, rep) for rep, vm in rows])


@blueprint.delete("/vms/<name>/replication")
@operation("Stop replicating a VM: no more ships; the DR SAN's replica points are dropped by a job",
           status=202, response=ref("Job"))
def disable(name: str):
    validation.reject_unknown(validation.json_body(), set())
    with context.session() as db:
        dr.replication_of(db, vm_named(db, validation.name(name, "name")))
    return submit_job("disable-replication", {"vm": name})


@blueprint.post("/vms/<name>/failover")
@operation("Run the VM at its DR site: planned (stop, last sync, switch: nothing lost) or, with planned: false, "
           "from the newest (or a chosen) replica point while the primary site is gone", status=202,
           response=ref("Job"), body=request_schema(Failover, exclude=frozenset({"vm"})))
def failover(name: str):
    return submit_job("failover", dr_params(name, {"planned", "point", "server"}))


@blueprint.post("/vms/<name>/failback")
@operation("Bring a failed-over VM home: ship what changed at the DR site since the failover, then a planned "
           "switch back; replication towards the DR site resumes", status=202, response=ref("Job"),
           body=request_schema(Failover, exclude=frozenset({"vm", "planned", "point"})))
def failback(name: str):
    return submit_job("failback", dr_params(name, {"server"}))


@blueprint.post("/vms/<name>/drill")
@operation("Boot a replica point at the DR site with no network, check it comes up, tear it down; replication "
           "and the VM go on", status=202, response=ref("Job"), body=request_schema(Drill, exclude=frozenset({"vm"})))
def drill(name: str):
    return submit_job("drill", dr_params(name, {"point", "server"}))


def dr_params(name: str, allowed: set[str]) -> dict[str, Any]:
    """The job parameters from the body (only `allowed` fields); the VM must exist and be replicated."""
    body = validation.json_body()
    validation.reject_unknown(body, allowed)
    with context.session() as db:
        dr.replication_of(db, vm_named(db, validation.name(name, "name")))
    params: dict[str, Any] = {"vm": name}
    if "planned" in body:
        if not isinstance(body["planned"], bool):
            raise validation.invalid("planned", "must be true or false")
        params["planned"] = body["planned"]
    for field in ("point", "server"):
        if body.get(field) is not None:
            params[field] = validation.name(body[field], field)
    return params
