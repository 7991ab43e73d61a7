"""Handing a recorded job to Celery, and the cancel flag workers look at."""

import logging

from celery import Celery

from config.logs import about_job
from models import Job

# The task every job ran under before each kind had its own name; still served for messages queued then.
RUN_JOB = "laxcluster.run_job"
log = logging.getLogger(__name__)


def dispatch(app: Celery, job: Job, *, rollback: bool = False, resume: bool = False) -> None:
    """Send the job's current attempt to its queue; call only after the job row is committed.

    `resume` takes up a parent that waits for its children; `rollback` only undoes a dead worker's job.
    The message goes to the kind's own task name, so Flower and the worker's log say what it is, and
    lists the job's target and parent; its task id is `celery_task_id(job)`. Its Celery result is not kept:
    the job's row is its result, and subscribing to a result nobody reads costs a Redis round trip.
    """
    app.send_task(task_name(job.kind), args=[job.id, job.attempt],
                  kwargs={"rollback": rollback, "resume": resume, "kind": job.kind, "target": job.target,
                          "parent": job.parent_id},
                  queue=job.queue, task_id=celery_task_id(job), ignore_result=True)
    with about_job(job.id, job.kind, job.target, job.attempt):
        log.info("sent to %s%s", job.queue, " to roll back" if rollback else " to resume" if resume else "")


def task_name(kind: str) -> str:
    """The Celery task that runs jobs of `kind` (every one is the job runner)."""
    return f"laxcluster.job.{kind}"


def celery_task_id(job: Job) -> str:
    """The Celery task id of the job's current attempt (resumes of an attempt reuse it)."""
    return f"{job.id}-{job.attempt}"


def cancel_key(job_id: str) -> str:
    return f"job:{job_id}:cancel"


def alive_key(job_id: str) -> str:
    return f"job:{job_id}:alive"
