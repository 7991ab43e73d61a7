"""How a parent job waits for its children without holding a Celery worker slot.

A workflow that must wait raises `Suspended`; the runner records the wait on the job (`waiting`,
`continuation`) and frees the worker. A child that ends wakes its parent by dispatching it again;
the parent's workflow then runs from the start, and every child it asks for again is found by its
step name (already made, maybe finished), so the replay walks quickly to where it stopped. Values
a replay must not recompute (a placement, a plan) are kept with `JobContext.once`.
The reconciler wakes waiting parents whose wake-up was lost or whose children ran out of time.
"""

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import FINAL_STATES, RUNNING, Job, utcnow
from tasks.dispatch import dispatch


@dataclass(frozen=True)
class Wait:
    """The children a parent waits for, and how their progress maps onto the parent's."""

    ids: list[str]
    deadline: str  # ISO time after which the parent is woken to fail with ChildrenTimedOut
    start: float = 0.0
    end: float = 100.0
    done: int = 0  # children that ended before these, counted in `total`
    total: int = 1
    any: bool = False  # wake when any of them ends, not only when all have

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, job: Job) -> "Wait | None":
        recorded = (job.continuation or {}).get("wait")
        return cls(**recorded) if recorded else None

    def overdue(self, now: datetime) -> bool:
        return now >= datetime.fromisoformat(self.deadline)


def deadline_for(children: list[Job], timeout: float) -> datetime:
    return min(child.created_at for child in children) + timedelta(seconds=timeout)


class Suspended(BaseException):
    """Raised by a workflow that waits for children; not an Exception, so no `except Exception` swallows it."""

    def __init__(self, wait: Wait) -> None:
        super().__init__(f"waiting for {len(wait.ids)} child jobs")
        self.wait = wait


def ready(session: Session, wait: Wait) -> bool:
    """Whether the children of `wait` have ended far enough for the parent to go on."""
    states = list(session.scalars(select(Job.state).where(Job.id.in_(wait.ids))))
    ended = [state in FINAL_STATES for state in states]
    return any(ended) if wait.any else all(ended)


def waiters_of(session: Session, ended: Job) -> list[str]:
    """The jobs waiting for `ended`: its parent, and any other job that waits for it by id."""
    waiting = session.scalars(select(Job).where(Job.waiting.is_(True), Job.state == RUNNING))
    return [job.id for job in waiting if job.id == ended.parent_id or _waits_for(job, ended.id)]


def _waits_for(job: Job, job_id: str) -> bool:
    wait = Wait.of(job)
    return wait is not None and job_id in wait.ids


def wake_all(session: Session, app: Celery, job_ids: list[str]) -> None:
    for job_id in job_ids:
        wake(session, app, job_id)


def wake(session: Session, app: Celery, job_id: str) -> bool:
    """Dispatch a waiting job again if its children let it go on (or its time is up); True if sent.

    Several wakers may send the same attempt: only one resume claims it, the others are stale.
    """
    job = session.get(Job, job_id)
    if job is None or not job.waiting:
        return False
    wait = Wait.of(job)
    if wait is not None and not (ready(session, wait) or wait.overdue(utcnow())):
        return False
    dispatch(app, job, resume=True)
    return True
