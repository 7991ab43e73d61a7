"""What a workflow sees of its job: parameters, progress reporting, cancel checks, child jobs."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import FINAL_STATES, SUCCEEDED, Job
from models.db import transaction
from tasks import jobs
from tasks.dispatch import cancel_key, dispatch
from tasks.progress import Reporter, announce
from tasks.runtime import Runtime


class JobContext:
    def __init__(self, rt: Runtime, app: Celery, job: Job, reporter: Reporter) -> None:
        self.rt = rt
        self.app = app
        self.job_id = job.id
        self.kind = job.kind
        self.target = job.target
        self.params: dict[str, Any] = dict(job.params)
        self.attempt = job.attempt
        self.requested_by = job.requested_by
        self.report = reporter

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A DB transaction, committed when the block ends without error."""
        with transaction(self.rt.sessions) as session:
            yield session

    def phase(self, name: str, progress: float | None = None) -> None:
        """Enter a named phase; a cancel requested meanwhile stops the job here."""
        self.check_cancel()
        self.report.update(phase=name, progress=progress)

    def check_cancel(self) -> None:
        """Raise JobCancelled if someone asked to cancel this job."""
        if self.rt.redis.exists(cancel_key(self.job_id)):
            raise jobs.JobCancelled(self.job_id)

    def spawn(self, kind: str, target: str, queue: str, params: dict[str, Any] | None = None) -> str:
        """Submit and dispatch a child job of this one; TargetBusy if its target is locked."""
        with self.session() as session:
            child, _ = jobs.submit(session, kind=kind, target=target, queue=queue, params=params,
                                   requested_by=self.requested_by, parent_id=self.job_id)
        announce(self.rt.redis, child)
        dispatch(self.app, child)
        return child.id

    def run_child(self, kind: str, target: str, queue: str, params: dict[str, Any], *, timeout: float,
                  start: float, end: float, cancellable: bool = True) -> dict[str, Any]:
        """Run one child job on `queue` to its end and return its result; its failure becomes ours.

        Cleanup paths pass `cancellable=False`: undoing work must finish even when the job was cancelled.
        """
        child_id = self.spawn(kind, target, queue, params)
        (child,) = self.wait_for_children([child_id], timeout, start, end, cancellable=cancellable)
        raise_unless_succeeded(child)
        return dict(child.result)

    def wait_for_children(self, child_ids: list[str], timeout: float, start: float = 0.0, end: float = 100.0,
                          *, cancellable: bool = True) -> list[Job]:
        """Wait until every child job is final, mapping their mean progress onto [start, end] (and a
        lone child's bytes onto this job's). A cancel of this job cancels the children still running
        and raises JobCancelled.
        """
        deadline = time.monotonic() + timeout
        while True:
            children = self.children(child_ids)
            if all(child.state in FINAL_STATES for child in children):
                return children
            mean = sum(100.0 if c.state in FINAL_STATES else c.progress for c in children) / max(len(children), 1)
            lone = children[0] if len(children) == 1 else None
            self.report.update(progress=start + (end - start) * mean / 100.0,
                               bytes_done=lone.bytes_done if lone else None, bytes_total=lone.bytes_total if lone else None)
            if cancellable:
                self.pass_cancel_on(child_ids)
            if time.monotonic() > deadline:
                raise jobs.ChildrenTimedOut(f"child jobs not finished after {timeout}s", jobs=child_ids)
            time.sleep(0.2)

    def children(self, child_ids: list[str]) -> list[Job]:
        with self.session() as session:
            return list(session.scalars(select(Job).where(Job.id.in_(child_ids))))

    def pass_cancel_on(self, child_ids: list[str]) -> None:
        """If this job was asked to cancel, cancel its children still running and raise JobCancelled."""
        if not self.rt.redis.exists(cancel_key(self.job_id)):
            return
        for child_id in child_ids:
            with self.session() as session:
                try:
                    jobs.request_cancel(session, self.rt.redis, child_id)
                except jobs.JobFinished:
                    continue
        raise jobs.JobCancelled(self.job_id)


def raise_unless_succeeded(child: Job) -> None:
    """Raise a child's failure as the parent's, under the child's own code (NoSpace, MigrationFailed ...)."""
    if child.state == SUCCEEDED:
        return
    error = jobs.ChildFailed(f"{child.kind} on {child.queue} {child.state}: {child.error_message or 'cancelled'}",
                             child_job=child.id)
    error.code = child.error_code or error.code
    raise error
