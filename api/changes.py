"""The one path every state-changing request takes: submit a job, audit it, dispatch it, answer 202.

Views validate their input first, then call `submit_job`. An `Idempotency-Key` header makes a
retry safe: the same key returns the job the first request made (200, nothing runs twice).
"""

from collections.abc import Callable
from contextlib import suppress
from typing import Any

import redis
from flask import Response, jsonify, request, url_for
from kombu.exceptions import OperationalError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import context, validation
from api.auth import current_caller
from api.representations import job_json
from errors import BrokerUnavailable, IdempotencyKeyReused, TargetBusy
from models import FAILED, AuditEvent, Job
from tasks import jobs
from tasks.dispatch import dispatch
from tasks.progress import announce

BROKER_ERRORS = (OperationalError, redis.RedisError, OSError)


def submit_job(*, kind: str, target: str, queue: str, action: str, params: dict[str, Any] | None = None,
               prepare: Callable[[Session], None] | None = None) -> Response:
    """Record and dispatch a job for the current request; 202 + Location, or 200 for a repeated Idempotency-Key.

    `prepare(db)` runs first in the same transaction as the job (e.g. reserving the rows the job
    works on), so its rows and the job commit together or not at all; a repeated key skips it.
    """
    params = params or {}
    key = validation.idempotency_key()
    try:
        with context.session() as db:
            if prepare is not None and not (key and _key_used(db, key)):
                prepare(db)
            job, created = jobs.submit(db, kind=kind, target=target, queue=queue, params=params,
                                       requested_by=current_caller().name, idempotency_key=key)
            if created:
                audit(db, action, target, job_id=job.id, params=params)
    except TargetBusy:
        # Two requests with one key racing: the loser's lock claim fails on the winner's job.
        job = _job_with_key(key) if key else None
        if job is None:
            raise
        created = False
    if not created:
        _check_same_request(job, kind, target, params)
        return job_response(job, 200)
    _start(job)
    return job_response(job, 202)


def audit(db: Session, action: str, target: str, **details: Any) -> None:
    """Record who did `action` to `target`, from where, in the caller's transaction."""
    db.add(AuditEvent(actor=current_caller().name, action=action, target=target,
                      source_ip=request.remote_addr, details=details))


def job_response(job: Job, status: int) -> Response:
    response = jsonify(job_json(job))
    response.status_code = status
    response.headers["Location"] = url_for("jobs.show", job_id=job.id)
    return response


def _start(job: Job) -> None:
    """Announce and dispatch a committed job; if the broker is down the job fails instead of waiting forever."""
    rt = context.runtime()
    try:
        announce(rt.redis, job)
        dispatch(context.celery(), job)
    except BROKER_ERRORS as error:
        failure = BrokerUnavailable(f"the job queue is unreachable ({type(error).__name__}); job {job.id} was not started",
                                    job_id=job.id)
        with context.session() as db:
            failed = jobs.finish(db, jobs.get(db, job.id), FAILED, error=failure)
        with suppress(*BROKER_ERRORS):
            announce(rt.redis, failed)
        raise failure from error


def _key_used(db: Session, key: str) -> bool:
    return db.scalar(select(Job.id).where(Job.idempotency_key == key)) is not None


def _job_with_key(key: str) -> Job | None:
    with context.session() as db:
        return db.scalar(select(Job).where(Job.idempotency_key == key))


def _check_same_request(job: Job, kind: str, target: str, params: dict[str, Any]) -> None:
    if (job.kind, job.target, job.params) != (kind, target, params):
        raise IdempotencyKeyReused(f"Idempotency-Key was already used for a different request (job {job.id})",
                                   job_id=job.id, field="Idempotency-Key")
