"""The HTTP face of `laxcluster check`: run a check (a job), and read the latest finished check's report."""

from flask import Blueprint, jsonify

from api import context, validation
from api.changes import submit_job
from api.openapi import operation, ref
from api.representations import job_json
from errors import CheckNotFound
from tasks.control.check import latest_report
from tasks.kinds import CheckCluster, request_schema

blueprint = Blueprint("check", __name__)


@blueprint.post("/check")
@operation("Compare the inventory with every SAN (volumes, snapshots, targets, LUNs, ACLs), server (domains) and "
           "the leases, as a job; with repair, also fix the drifts that are safe to fix",
           body=request_schema(CheckCluster), status=202, response=ref("Job"))
def run():
    body = validation.json_body()
    validation.reject_unknown(body, {"repair", "timeout_s"})
    params = {}
    if "repair" in body:
        if not isinstance(body["repair"], bool):
            raise validation.invalid("repair", "must be true or false")
        params["repair"] = body["repair"]
    if "timeout_s" in body:
        params["timeout_s"] = validation.integer(body["timeout_s"], "timeout_s", 1, 3600)
    return submit_job("check-cluster", params)


@blueprint.get("/check")
@operation("The report of the latest check that finished: every drift with the command that repairs it",
           response=ref("CheckReport"))
def latest():
    with context.session() as db:
        job = latest_report(db)
        if job is None:
            raise CheckNotFound("no check has finished yet: POST /check (laxcluster check) runs one")
        return jsonify({"job": job_json(job), **job.result})
