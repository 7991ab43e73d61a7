"""What a workflow sees of its job: parameters, progress reporting, cancel checks, child jobs.

Waiting for children never blocks a worker: `wait_for_children` returns the children when they have
ended and otherwise raises `Suspended` (see tasks.continuations), so a workflow runs again from the
start when they end. Its children are named steps, found again on every run.
"""

import copy
import logging
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

import redis
from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from errors import ChildFailed, ChildrenTimedOut, JobFinished
from models import FINAL_STATES, SUCCEEDED, Job, utcnow
from models.db import transaction
from tasks import jobs, submission
from tasks.continuations import Suspended, Wait, deadline_for
from tasks.dispatch import cancel_key
from tasks.faults import kill_here_if_asked
from tasks.kinds import kind_of, parse
from tasks.progress import Reporter
from tasks.runtime import Runtime

T = TypeVar("T")

log = logging.getLogger(__name__)


class JobContext:
    def __init__(self, rt: Runtime, app: Celery, job: Job, reporter: Reporter) -> None:
        self.rt = rt
        self.app = app
        self.job_id = job.id
        self.kind = job.kind
        self.target = job.target
        self.params: Any = parse(kind_of(job.kind), job.params)
        self.attempt = job.attempt
        self.requested_by = job.requested_by
        self.started_at = job.started_at
        self.report = reporter
        self.continuation: dict[str, Any] = dict(job.continuation or {})
        self._stage = "run"
        self._seen: dict[str, int] = {}
        # A job that already has children runs again after a wait: its phases up to the first new
        # child were reported before, so they are held back instead of replayed to watchers.
        self._replaying = self._may_have_children(job) and self._has_children()
        self._held_phase: tuple[str, float | None] | None = None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A DB transaction, committed when the block ends without error."""
        with transaction(self.rt.sessions) as session:
            yield session

    def phase(self, name: str, progress: float | None = None) -> None:
        """Enter a named phase; a cancel requested meanwhile stops the job here, and so does the loss of
        the job to a newer attempt (StaleRun)."""
        self.check_cancel()
        with self.session() as session:
            if self._replaying:
                jobs.owned(session, self.job_id, self.attempt)
                self._held_phase = (name, progress)
            elif not self.report.update(phase=name, progress=progress, session=session):
                raise jobs.StaleRun(self.job_id)
        kill_here_if_asked(self.kind, name)
        if not self._replaying:
            log.info("phase %s", name)

    def check_cancel(self) -> None:
        """Raise JobCancelled if someone asked to cancel this job."""
        if self.cancel_asked():
            raise jobs.JobCancelled(self.job_id)

    def cancel_asked(self) -> bool:
        """Whether someone asked to cancel this job: Redis's flag, or the DB's while Redis is away."""
        try:
            return bool(self.rt.redis.exists(cancel_key(self.job_id)))
        except redis.RedisError:
            with self.session() as session:
                return bool(session.get(Job, self.job_id).cancel_requested)

    def enter_cleanup(self) -> None:
        """Children made from here on belong to the cleanup, apart from those of the run it undoes."""
        self._stage, self._seen = "cleanup", {}

    def once(self, name: str, compute: Callable[[], T]) -> T:
        """`compute()` on the first run, the remembered value on every later one (JSON-serialisable values)."""
        memo = self.continuation.setdefault("memo", {})
        if name not in memo:
            memo[name] = compute()
            with self.session() as session:
                jobs.owned(session, self.job_id, self.attempt).continuation = dict(self.continuation)
        return copy.deepcopy(memo[name])

    def remembered(self, name: str) -> Any:
        """What `once(name, ...)` remembered, or None if no run got that far (a cleanup undoes only what was chosen)."""
        return copy.deepcopy(self.continuation.get("memo", {}).get(name))

    def spawn(self, kind: str, params: dict[str, Any] | None = None, *, step: str | None = None) -> str:
        """Start a child job of this one, or find the one an earlier run started for this step.

        The step defaults to the kind and parameters, numbered by how often this run asked for them.
        TargetBusy if the child's target is locked by another job.
        """
        key = self._step_key(step or f"{kind}:{json.dumps(params or {}, sort_keys=True)}")
        with self.session() as session:
            existing = session.scalar(select(Job.id).where(Job.parent_id == self.job_id, Job.step == key))
        if existing is not None:
            return existing
        self._stop_replaying()
        with self.session() as session:
            child, _ = submission.submit(session, kind, params, submission.Requester(self.requested_by),
                                         parent_id=self.job_id, step=key)
        submission.launch(self.rt, self.app, child)
        return child.id

    def run_child(self, kind: str, params: dict[str, Any], *, timeout: float, start: float, end: float,
                  cancellable: bool = True) -> dict[str, Any]:
        """Run one child job to its end and return its result; its failure becomes ours.

        Cleanup paths pass `cancellable=False`: undoing work must finish even when the job was cancelled.
        """
        child_id = self.spawn(kind, params)
        (child,) = self.wait_for_children([child_id], timeout, start, end, cancellable=cancellable)
        raise_unless_succeeded(child)
        return dict(child.result)

    def wait_for_children(self, child_ids: list[str], timeout: float, start: float = 0.0, end: float = 100.0,
                          *, cancellable: bool = True) -> list[Job]:
        """The children once every one has ended; until then the job suspends, its progress on [start, end]
        following theirs. A cancel of this job cancels the children still running and raises JobCancelled."""
        return self._wait(child_ids, timeout, Wait(child_ids, "", start, end, 0, len(child_ids)), cancellable)

    def wait_for_any(self, child_ids: list[str], timeout: float, start: float, end: float, *, done: int,
                     total: int) -> list[Job]:
        """The children once one of them has ended (to start the next of a batch); progress counts
        `done` ended children of `total`."""
        return self._wait(child_ids, timeout, Wait(child_ids, "", start, end, done, total, any=True), True)

    def wait_for_other_job(self, job_id: str, timeout: float) -> bool:
        """Suspend until another job (not a child: e.g. one holding a lock this job must not work beside)
        has ended; True once it has, False when `timeout` has passed since this job first waited for it."""
        with self.session() as session:
            other = session.get(Job, job_id)
        if other is None or other.state in FINAL_STATES:
            return True
        deadline = datetime.fromisoformat(self.once(f"wait for {job_id}",
                                                    lambda: (utcnow() + timedelta(seconds=timeout)).isoformat()))
        if utcnow() >= deadline:
            return False
        raise Suspended(Wait([job_id], deadline.isoformat(), start=self.report.progress, end=self.report.progress))

    def _wait(self, child_ids: list[str], timeout: float, wait: Wait, cancellable: bool) -> list[Job]:
        children = self.children(child_ids)
        if cancellable:
            self.pass_cancel_on(child_ids)
        ended = [child.state in FINAL_STATES for child in children]
        if all(ended) or (wait.any and any(ended)):
            return children
        deadline = deadline_for(children, timeout)
        if utcnow() >= deadline:
            # Cancelled, so a child stuck in a queue nobody serves does not keep its lock forever.
            self._cancel_children(child_ids)
            raise ChildrenTimedOut(f"child jobs not finished after {timeout}s", jobs=child_ids)
        raise Suspended(Wait(**{**wait.as_dict(), "deadline": deadline.isoformat()}))

    def children(self, child_ids: list[str]) -> list[Job]:
        with self.session() as session:
            by_id = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(child_ids)))}
        return [by_id[child_id] for child_id in child_ids]

    def children_of_kind(self, kind: str) -> list[str]:
        with self.session() as session:
            return list(session.scalars(select(Job.id).where(Job.parent_id == self.job_id, Job.kind == kind)))

    def elapsed_ms(self) -> int:
        """Time since the job started, across the runs it took (a wait for children ends a run)."""
        return int((utcnow() - self.started_at).total_seconds() * 1000)

    def record_result(self, result: dict[str, Any]) -> None:
        """Keep what is known so far on the job's result, so a failed job still shows it."""
        with self.session() as session:
            jobs.owned(session, self.job_id, self.attempt).result = result

    def recorded_result(self) -> dict[str, Any]:
        with self.session() as session:
            return dict(session.get(Job, self.job_id).result or {})

    def pass_cancel_on(self, child_ids: list[str]) -> None:
        """If this job was asked to cancel, cancel its children still running and raise JobCancelled."""
        if not self.cancel_asked():
            return
        self._cancel_children(child_ids)
        raise jobs.JobCancelled(self.job_id)

    def _cancel_children(self, child_ids: list[str]) -> None:
        for child_id in child_ids:
            with self.session() as session:
                try:
                    jobs.request_cancel(session, self.rt.redis, child_id)
                except JobFinished:
                    continue

    def _step_key(self, base: str) -> str:
        count = self._seen.get(base, 0)
        self._seen[base] = count + 1
        digest = hashlib.sha256(base.encode()).hexdigest()[:24]
        return f"{self._stage}:{digest}#{count}"

    def _stop_replaying(self) -> None:
        if self._replaying:
            self._replaying = False
            if self._held_phase is not None:
                self.report.update(phase=self._held_phase[0], progress=self._held_phase[1])

    @staticmethod
    def _may_have_children(job: Job) -> bool:
        # A first attempt that never waited has made no children yet: spare it the query.
        return job.attempt > 1 or bool(job.continuation)

    def _has_children(self) -> bool:
        with self.session() as session:
            return bool(session.scalar(select(func.count()).select_from(Job).where(Job.parent_id == self.job_id)))


def raise_unless_succeeded(child: Job) -> None:
    """Raise a child's failure as the parent's, under the child's own code (NoSpace, MigrationFailed ...)."""
    if child.state == SUCCEEDED:
        return
    error = ChildFailed(f"{child.kind} on {child.queue} {child.state}: {child.error_message or 'cancelled'}",
                             child_job=child.id)
    error.code = child.error_code or error.code
    raise error
