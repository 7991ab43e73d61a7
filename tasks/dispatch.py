"""Handing a recorded job to Celery, and the cancel flag workers look at."""

from celery import Celery

from models import Job

RUN_JOB = "laxcluster.run_job"


def dispatch(app: Celery, job: Job, *, rollback: bool = False, resume: bool = False) -> None:
    """Send the job's current attempt to its queue; call only after the job row is committed.

    `resume` takes up a parent that waits for its children; `rollback` only undoes a dead worker's job.
    """
    app.send_task(RUN_JOB, args=[job.id, job.attempt], kwargs={"rollback": rollback, "resume": resume},
                  queue=job.queue)


def cancel_key(job_id: str) -> str:
    return f"job:{job_id}:cancel"


def alive_key(job_id: str) -> str:
    return f"job:{job_id}:alive"
