"""The HTTP face of jobs: list, show, cancel, follow as Server-Sent Events, and a no-op job for diagnostics."""

import uuid

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import or_, select

from api import context, validation
from api.auth import current_caller
from api.changes import audit, job_response, submit_job
from api.events import job_events
from api.openapi import list_of, operation, ref
from api.representations import job_json
from api.streams import streamed
from models import FINAL_STATES, STATES, Job
from tasks import jobs, submission
from tasks.kinds import NOOP_MAX_SECONDS, NOOP_MAX_STEPS, Noop, request_schema
from tasks.progress import announce
from tasks.runner import force_end

blueprint = Blueprint("jobs", __name__)

MAX_LIMIT = 500


@blueprint.get("/jobs")
@operation("List jobs, newest first", response=list_of("Job"), query={
    "kind": {"type": "string"}, "target": {"type": "string"},
    "state": {"enum": list(STATES)}, "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50},
})
def index():
    query = select(Job).order_by(Job.created_at.desc(), Job.id).limit(
        validation.integer(request.args.get("limit", 50), "limit", 1, MAX_LIMIT))
    if "kind" in request.args:
        query = query.where(Job.kind == request.args["kind"])
    if "target" in request.args:
        # A bare name ("web1") finds the jobs of whatever it names: vm/web1, server/web1 ...
        target = request.args["target"]
        query = query.where(or_(Job.target == target, Job.target.like(f"%/{_escape_like(target)}", escape="\\")))
    if "state" in request.args:
        query = query.where(Job.state == validation.choice(request.args["state"], "state", STATES))
    with context.session() as db:
        return jsonify(items=[job_json(job) for job in db.scalars(query)])


@blueprint.get("/jobs/<job_id>")
@operation("Show one job", response=ref("Job"))
def show(job_id: str):
    with context.session() as db:
        return jsonify(job_json(jobs.get(db, job_id)))


@blueprint.post("/jobs/<job_id>/cancel")
@operation("Cancel a job: a queued one never starts, a running one stops at its next check",
           status=202, response=ref("Job"))
def cancel(job_id: str):
    rt = context.runtime()
    job = submission.cancel(rt, context.celery(), job_id)
    with context.session() as db:
        audit(db, "job.cancel", job.target, job_id=job.id)
    if job.state in FINAL_STATES:
        announce(rt.redis, job)
    return job_response(job, 200 if job.state in FINAL_STATES else 202)


@blueprint.post("/jobs/<job_id>/force-cancel")
@operation("End a stuck job now (its worker died and no worker of its queue is left to roll it back): failed "
           "with ForceCancelled, its lock freed, its children too; its cleanup does not run", role="admin",
           response=ref("Job"))
def force_cancel(job_id: str):
    job = force_end(context.runtime(), job_id, current_caller().name)
    with context.session() as db:
        audit(db, "job.force-cancel", job.target, job_id=job.id)
    return jsonify(job_json(job))


@blueprint.get("/jobs/<job_id>/events")
@operation("Follow a job as Server-Sent Events: its history, then live events, until it is final; "
           "503 TooManyStreams (with Retry-After) while every stream slot is taken",
           media_type="text/event-stream", response={"type": "string"})
def events(job_id: str):
    return event_stream(job_id)


def event_stream(job_id: str) -> Response:
    """Job `job_id`'s events as a Server-Sent Events response from the client's Last-Event-ID on (JobNotFound
    first); the web console's job page follows the same stream."""
    rt = context.runtime()
    with context.session() as db:
        jobs.get(db, job_id)
    after = validation.integer(request.headers.get("Last-Event-ID", 0), "Last-Event-ID", 0, 2**62)
    keepalive_s = current_app.config["SSE_KEEPALIVE_S"]
    return streamed(lambda: Response(job_events(rt, job_id, after_seq=after, keepalive_s=keepalive_s),
                                     mimetype="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}))

# The job's own parameters, plus the name of the lock to take.
NOOP_BODY = request_schema(Noop)
NOOP_BODY["properties"]["target"] = {"type": "string", "pattern": validation.NAME.pattern,
                                     "description": "lock this name (noop/<target>) to try conflicts; default: a fresh one"}


@blueprint.post("/jobs/noop")
@operation("Run a job that does nothing for `seconds` in `steps` phases (diagnostics, benchmarks)",
           role="admin", status=202, response=ref("Job"), body=NOOP_BODY)
def noop():
    body = validation.json_body()
    validation.reject_unknown(body, {"seconds", "steps", "target"})
    params = {"seconds": validation.number(body.get("seconds", 0), "seconds", 0, NOOP_MAX_SECONDS),
              "steps": validation.integer(body.get("steps", 1), "steps", 1, NOOP_MAX_STEPS)}
    name = validation.name(body["target"], "target") if "target" in body else _fresh_name(validation.idempotency_key())
    return submit_job("noop", params, target=f"noop/{name}")


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _fresh_name(idempotency_key: str | None) -> str:
    """A lock name of its own for a noop job; a retried request (same key) gets the same one."""
    unique = uuid.uuid5(uuid.NAMESPACE_URL, idempotency_key) if idempotency_key else uuid.uuid4()
    return f"job-{unique.hex[:12]}"
