"""Handing a recorded job to Celery, and the cancel flag workers look at."""

import logging

from celery import Celery

from config.logs import about_job
from models import Job

RUN_JOB = "laxcluster.run_job"
log = logging.getLogger(__name__)


def dispatch(app: Celery, job: Job, *, rollback: bool = False, resume: bool = False) -> None:
    """Send the job's current attempt to its queue; call only after the job row is committed.

    `resume` takes up a parent that waits for its children; `rollback` only undoes a dead worker's job.
    Flower and the worker's log name the message by the job's kind (Celery's `shadow` name) and list its
    target and parent; its task id is `celery_task_id(job)`.
    """
    app.send_task(RUN_JOB, args=[job.id, job.attempt],
                  kwargs={"rollback": rollback, "resume": resume, "kind": job.kind, "target": job.target,
                          "parent": job.parent_id},
                  queue=job.queue, task_id=celery_task_id(job), shadow=f"laxcluster.{job.kind}")
    with about_job(job.id, job.kind, job.target, job.attempt):
        log.info("sent to %s%s", job.queue, " to roll back" if rollback else " to resume" if resume else "")


def celery_task_id(job: Job) -> str:
    """The Celery task id of the job's current attempt (resumes of an attempt reuse it)."""
    return f"{job.id}-{job.attempt}"


def cancel_key(job_id: str) -> str:
    return f"job:{job_id}:cancel"


def alive_key(job_id: str) -> str:
    return f"job:{job_id}:alive"
