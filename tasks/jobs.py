"""The life of a job in the DB: submit (with its lock), claim, finish, cancel.

The DB is the source of truth; Celery only carries `(job_id, attempt)`. A worker claims a job by
moving its `attempt` forward atomically, so a stale or duplicate message can never run it twice.
A job holds a lock on its target from submission to its final state.
"""

from typing import Any

import redis
from sqlalchemy import Update, delete, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from errors import ForceCancelled, JobAlive, JobFinished, JobNotFound, LaxError, TargetBusy
from models import CANCELLED, FAILED, FINAL_STATES, QUEUED, RUNNING, Job, JobLock, utcnow
from tasks.dispatch import alive_key, cancel_key


class StaleRun(BaseException):
    """This run of a job lost it to a newer attempt (the reconciler thought its worker dead and ran the
    job again): it must write nothing more about the job. Not an Exception, so no workflow swallows it."""


class JobCancelled(Exception):
    """Raised inside a workflow at a cancel check; the runner cleans up and ends the job `cancelled`."""


def submit(session: Session, *, kind: str, target: str, queue: str, params: dict[str, Any] | None = None,
           requested_by: str = "system", idempotency_key: str | None = None, parent_id: str | None = None,
           step: str | None = None, request_digest: str | None = None) -> tuple[Job, bool]:
    """Record a new queued job holding the lock on `target`; return (job, created).

    The same idempotency key returns the job it first made (created=False) and runs nothing new.
    A target locked by an unfinished job raises TargetBusy naming that job. The caller commits,
    then calls `dispatch`.
    """
    if idempotency_key:
        existing = session.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
        if existing is not None:
            return existing, False
    job = Job(kind=kind, target=target, queue=queue, params=params or {}, requested_by=requested_by,
              idempotency_key=idempotency_key, parent_id=parent_id, step=step, request_digest=request_digest,
              state=QUEUED)
    session.add(job)
    session.flush()
    if not _take_lock(session, target, job.id):
        session.delete(job)  # callers that go on after TargetBusy commit no lockless job
        session.flush()
        holder = session.scalar(select(JobLock.job_id).where(JobLock.target == target))
        raise TargetBusy(f"{target} is busy with job {holder}", job_id=holder, target=target)
    return job, True


def _take_lock(session: Session, target: str, job_id: str) -> bool:
    """Insert the lock row unless the target already has one; whether this job got it.

    ON CONFLICT DO NOTHING rather than a savepoint around a plain insert: one statement instead of three,
    and the transaction stays usable either way.
    """
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    taken = session.execute(insert(JobLock).values(target=target, job_id=job_id, created_at=utcnow())
                            .on_conflict_do_nothing(index_elements=[JobLock.target]).returning(JobLock.job_id))
    return taken.first() is not None


def holder_of(session: Session, target: str) -> str | None:
    return session.scalar(select(JobLock.job_id).where(JobLock.target == target))


def get(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}", job_id=job_id)
    return job


def claim(session: Session, job_id: str, attempt: int, worker: str) -> Job | None:
    """Start (or, after a crash, restart) a job if `attempt` is still current; None if the message is stale."""
    return _claimed(session, update(Job)
                    .where(Job.id == job_id, Job.attempt == attempt, Job.state.in_((QUEUED, RUNNING)))
                    .values(state=RUNNING, attempt=Job.attempt + 1, waiting=False, worker=worker, started_at=utcnow(),
                            updated_at=utcnow()))


def claim_resume(session: Session, job_id: str, attempt: int, worker: str) -> Job | None:
    """Take a waiting parent back up; None unless it still waits in `attempt` (a duplicate wake is stale).

    A resume is not a new attempt: only a crash counts toward `max_attempts`.
    """
    return _claimed(session, update(Job)
                    .where(Job.id == job_id, Job.attempt == attempt, Job.state == RUNNING, Job.waiting.is_(True))
                    .values(waiting=False, worker=worker, updated_at=utcnow()))


def _claimed(session: Session, claim: Update) -> Job | None:
    # RETURNING hands back the claimed row with the update: one statement, not an update and a select.
    return session.scalars(claim.returning(Job), execution_options={"populate_existing": True}).one_or_none()


def owned(session: Session, job_id: str, attempt: int) -> Job:
    """The job's row, locked for this transaction, while run `attempt` still owns it; StaleRun otherwise.
    Every write a run makes about its own job goes through here."""
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.attempt != attempt or job.state != RUNNING:
        raise StaleRun(job_id)
    return job


def suspend(session: Session, job_id: str, attempt: int, continuation: dict[str, Any]) -> Job:
    """Mark a running job as waiting for its children, keeping what its next run needs."""
    job = owned(session, job_id, attempt)
    job.waiting, job.continuation, job.updated_at = True, continuation, utcnow()
    return job


def unfinished_children(session: Session, job_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.parent_id == job_id, Job.state.not_in(FINAL_STATES))))


def finish(session: Session, job: Job, state: str, *, result: dict[str, Any] | None = None,
           error: LaxError | None = None) -> Job:
    """Put a job into a final state and release its lock, in the caller's transaction."""
    job.state = state
    job.finished_at = job.updated_at = utcnow()
    if result is not None:
        job.result = result
    if state != CANCELLED and error is None:
        job.progress = 100.0
    if error is not None:
        job.error_code, job.error_message = error.code, error.message
    session.execute(delete(JobLock).where(JobLock.job_id == job.id))
    return job


def force_fail(session: Session, client: redis.Redis, job_id: str, actor: str) -> list[Job]:
    """End a job no worker will end (its worker died and its queue has no consumer to roll it back), and
    its unfinished descendants: failed with ForceCancelled, locks freed. Their cleanups do not run.
    Returns the jobs ended, descendants first. JobAlive while a worker still beats for it."""
    job = get(session, job_id)
    if job.state in FINAL_STATES:
        raise JobFinished(f"job {job_id} already {job.state}", job_id=job_id, state=job.state)
    if client.get(alive_key(job_id)) == "running":
        raise JobAlive(f"job {job_id} has a live worker: cancel it without force", job_id=job_id)
    ended = [done for child in unfinished_children(session, job_id) for done in force_fail(session, client, child.id, actor)]
    client.set(cancel_key(job_id), 1, ex=7 * 24 * 3600)
    job.cancel_requested = True
    error = ForceCancelled(f"ended by force by {actor}; its cleanup did not run: `laxcluster check` lists what it "
                           "left", job_id=job_id)
    return [*ended, finish(session, job, FAILED, error=error)]


def request_cancel(session: Session, client: redis.Redis, job_id: str) -> Job:
    """Cancel a job: a queued one ends `cancelled` now; a running one is flagged and stops at its next check.

    A parent waiting for its children runs no code to see the flag, so its children are cancelled
    instead (unless it waits for its cleanup, which must finish); their ends wake it.
    """
    job = get(session, job_id)
    if job.state in FINAL_STATES:
        raise JobFinished(f"job {job_id} already {job.state}", job_id=job_id, state=job.state)
    if job.waiting and "cleanup" not in job.continuation:
        for child in unfinished_children(session, job_id):
            request_cancel(session, client, child.id)
    client.set(cancel_key(job_id), 1, ex=7 * 24 * 3600)
    still_queued = session.execute(
        update(Job).where(Job.id == job_id, Job.state == QUEUED)
        .values(state=CANCELLED, cancel_requested=True, finished_at=utcnow(), updated_at=utcnow())
    ).rowcount
    if still_queued:
        session.execute(delete(JobLock).where(JobLock.job_id == job_id))
    else:
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    return session.get(Job, job_id, populate_existing=True)
