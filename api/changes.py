"""The one path every state-changing request takes: submit a job, audit it, dispatch it, answer 202.

Views validate their input first, then call `submit_job`. An `Idempotency-Key` header makes a
retry safe: the same key returns the job the first request made (200, nothing runs twice).
"""

import hashlib
import json
from collections.abc import Callable
from typing import Any

from flask import Response, jsonify, request, url_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import context, validation
from api.auth import current_caller
from api.representations import job_json
from errors import IdempotencyKeyReused, TargetBusy
from models import AuditEvent, Job
from tasks import submission


def submit_job(kind: str, params: dict[str, Any] | None = None, *, target: str | None = None,
               prepare: Callable[[Session], None] | None = None) -> Response:
    """Record and dispatch a job for the current request; 202 + Location, or 200 for a repeated Idempotency-Key.

    `prepare(db)` runs first in the same transaction as the job (e.g. reserving the rows the job
    works on), so its rows and the job commit together or not at all; a repeated key skips it.
    """
    key = validation.idempotency_key()
    digest = request_digest()
    requester = submission.Requester(current_caller().name, request.remote_addr)
    try:
        with context.session() as db:
            if prepare is not None and not (key and _key_used(db, key)):
                prepare(db)
            job, created = submission.submit(db, kind, params, requester, target=target, idempotency_key=key,
                                             request_digest=digest)
    except TargetBusy:
        # Two requests with one key racing: the loser's lock claim fails on the winner's job.
        job = _job_with_key(key) if key else None
        if job is None:
            raise
        created = False
    if not created:
        _check_same_request(job, digest)
        return job_response(job, 200)
    submission.launch(context.runtime(), context.celery(), job)
    return job_response(job, 202)


def start_job(kind: str, params: dict[str, Any], *, prepare: Callable[[Session], None] | None = None) -> Job:
    """Record and dispatch a job for the current caller, with no idempotency key (the web console's forms);
    `prepare(db)` as for submit_job."""
    requester = submission.Requester(current_caller().name, request.remote_addr)
    with context.session() as db:
        if prepare is not None:
            prepare(db)
        job, _ = submission.submit(db, kind, params, requester)
    submission.launch(context.runtime(), context.celery(), job)
    return job


def audit(db: Session, action: str, target: str, **details: Any) -> None:
    """Record who did `action` to `target`, from where, in the caller's transaction."""
    db.add(AuditEvent(actor=current_caller().name, action=action, target=target,
                      source_ip=request.remote_addr, details=details))


def job_response(job: Job, status: int) -> Response:
    response = jsonify(job_json(job))
    response.status_code = status
    response.headers["Location"] = url_for("jobs.show", job_id=job.id)
    return response


def _key_used(db: Session, key: str) -> bool:
    return db.scalar(select(Job.id).where(Job.idempotency_key == key)) is not None


def _job_with_key(key: str) -> Job | None:
    with context.session() as db:
        return db.scalar(select(Job).where(Job.idempotency_key == key))


def request_digest() -> str:
    """SHA-256 of the request's method, path and JSON body (keys sorted, so their order does not count)."""
    body = json.dumps(validation.json_body(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{request.method} {request.path}\n{body}".encode()).hexdigest()


def _check_same_request(job: Job, digest: str) -> None:
    if job.request_digest != digest:
        raise IdempotencyKeyReused(f"Idempotency-Key was already used for a different request (job {job.id})",
                                   job_id=job.id, field="Idempotency-Key")
