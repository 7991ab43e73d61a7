"""The one way to start a job: the API, the launcher's first jobs, the scheduler and parent jobs all
come through here. Given a kind and its parameters, it validates them, picks the queue and the lock
target, records the job (and, for a top-level job, its audit event), then announces and dispatches it.
"""

import logging
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from sqlalchemy.orm import Session

from config.logs import about_job
from errors import BrokerUnavailable
from models import FAILED, AuditEvent, Job
from models.db import transaction
from tasks import jobs
from tasks.continuations import wake
from tasks.dispatch import dispatch
from tasks.kinds import Params, kind_of, parse, stored
from tasks.progress import announce
from tasks.runtime import Runtime

BROKER_ERRORS = (OperationalError, redis.RedisError, OSError)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requester:
    """Who asks for a job: a user (with the address the request came from) or a part of LaxCluster."""

    name: str
    source_ip: str | None = None


def submit(session: Session, kind: str, params: dict[str, Any] | Params | None, requester: Requester, *,
           target: str | None = None, idempotency_key: str | None = None, parent_id: str | None = None,
           step: str | None = None, request_digest: str | None = None) -> tuple[Job, bool]:
    """Record a queued job of `kind` in the caller's transaction; return (job, created).

    `target` is needed only for kinds whose declaration does not derive one. A top-level job also
    gets its audit event. TargetBusy if the target is locked; InvalidInput if the parameters are wrong.
    """
    declared = kind_of(kind)
    typed = parse(declared, params)
    locks = declared.target(session, typed) if declared.target is not None else target
    job, created = jobs.submit(session, kind=kind, target=locks, queue=declared.queue(session, typed),
                               params=stored(typed), requested_by=requester.name, idempotency_key=idempotency_key,
                               parent_id=parent_id, step=step, request_digest=request_digest)
    if created and parent_id is None:
        session.add(AuditEvent(actor=requester.name, action=declared.action or f"job.{kind}", target=locks,
                               source_ip=requester.source_ip, details={"job_id": job.id, "params": job.params}))
    return job, created


def launch(rt: Runtime, app: Celery, job: Job) -> None:
    """Announce and dispatch a committed job; if the broker is down the job fails instead of waiting forever."""
    with about_job(job.id, job.kind, job.target, job.attempt, job.parent_id):
        log.info("submitted by %s", job.requested_by)
    try:
        announce(rt.redis, job)
        dispatch(app, job)
    except BROKER_ERRORS as error:
        failure = BrokerUnavailable(f"the job queue is unreachable ({type(error).__name__}); job {job.id} was not started",
                                    job_id=job.id)
        with transaction(rt.sessions) as session:
            failed = jobs.finish(session, jobs.get(session, job.id), FAILED, error=failure)
        with suppress(*BROKER_ERRORS):
            announce(rt.redis, failed)
        raise failure from error


def start(rt: Runtime, app: Celery, kind: str, params: dict[str, Any] | Params | None, requester: Requester,
          **options: Any) -> Job:
    """Submit (in a transaction of its own) and launch a job; an existing job for the same idempotency key
    is returned without starting anything."""
    with transaction(rt.sessions) as session:
        job, created = submit(session, kind, params, requester, **options)
    if created:
        launch(rt, app, job)
    return job


def cancel(rt: Runtime, app: Celery, job_id: str) -> Job:
    """Ask a job to stop (see jobs.request_cancel); a waiting parent whose children all ended at once
    is woken to run its cleanup."""
    with transaction(rt.sessions) as session:
        job = jobs.request_cancel(session, rt.redis, job_id)
    with transaction(rt.sessions) as session:
        wake(session, app, job_id)
    return job
