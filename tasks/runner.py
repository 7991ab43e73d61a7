"""The one Celery task that runs every job: claim, heartbeat, run the workflow, clean up, finish.

A workflow waiting for children suspends (tasks.continuations): the runner records the wait, frees
the worker, and the children's ends dispatch the job again with `resume`.
"""

import logging
import socket
import threading
from contextlib import suppress
from typing import Any

import redis

from config.logs import about_job
from errors import CleanupFailed, InternalError, LaxError, WorkerLost
from models import CANCELLED, FAILED, SUCCEEDED, Job
from models.db import transaction
from tasks import jobs, runtime
from tasks.app import app
from tasks.context import JobContext
from tasks.continuations import Suspended, waiters_of, wake, wake_all
from tasks.dispatch import RUN_JOB, alive_key, task_name
from tasks.kinds import KINDS
from tasks.progress import Reporter, announce_if_possible
from tasks.runtime import Runtime
from tasks.workflow import Workflow, lookup

log = logging.getLogger(__name__)


WAITING = "waiting"


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str, attempt: int, rollback: bool = False, resume: bool = False, kind: str = "",
            target: str = "", parent: str | None = None) -> str:
    """Run (or, with `rollback`, only undo; with `resume`, take up again after its children) attempt
    `attempt` of a job; a stale message does nothing. `kind`, `target` and `parent` label the message
    (for Flower) and every line logged meanwhile."""
    with about_job(job_id, kind, target, attempt, parent):
        outcome = _run_attempt(job_id, attempt, rollback=rollback, resume=resume)
        log.info("attempt %s ended: %s", attempt, outcome)
        return outcome


for _kind in KINDS:
    app.task(name=task_name(_kind), acks_late=True, reject_on_worker_lost=True, ignore_result=True)(run_job.run)


def _run_attempt(job_id: str, attempt: int, *, rollback: bool, resume: bool) -> str:
    rt = runtime.current()
    worker = f"{socket.gethostname()}:{threading.get_native_id()}"
    with transaction(rt.sessions) as session:
        claim = jobs.claim_resume if resume else jobs.claim
        job = claim(session, job_id, attempt, worker=worker)
    if job is None:
        return "stale"
    log.info("attempt %s %s on %s%s", attempt, "resumed" if resume else "started", worker,
             ", only to roll back" if rollback else "")
    if not resume:
        announce_if_possible(rt.redis, job)
    with Heartbeat(rt, job.id):
        try:
            outcome = execute(rt, job, lookup(job.kind), rollback=rollback)
        except jobs.StaleRun:
            log.warning("job %s: attempt %s lost the job to a newer attempt and stopped", job.id, job.attempt)
            return "stale"
    if outcome == WAITING:
        # A child may have ended before the job was marked waiting, and found nobody to wake.
        with transaction(rt.sessions) as session:
            wake(session, app, job.id)
    return outcome


def execute(rt: Runtime, job: Job, flow: Workflow, *, rollback: bool = False) -> str:
    ctx = JobContext(rt, app, job, Reporter(job.id, rt.sessions, rt.redis, rt.config.section("jobs")["db_write_interval_s"],
                                            resumed_from=job, attempt=job.attempt))
    pending = ctx.continuation.get("cleanup")
    if pending is not None:
        return _end(rt, ctx, flow, pending["state"], _error_from(pending["error"]))
    try:
        if rollback:
            raise WorkerLost(f"the worker running job {job.id} died; its work was rolled back")
        ctx.check_cancel()
        result = flow.run(ctx) or {}
    except Suspended as suspended:
        return _suspend(rt, ctx, suspended)
    except jobs.JobCancelled:
        return _end(rt, ctx, flow, CANCELLED, error=None)
    except LaxError as error:
        return _end(rt, ctx, flow, FAILED, error=error)
    except Exception as error:
        log.exception("job %s (%s) crashed", job.id, job.kind)
        return _end(rt, ctx, flow, FAILED, error=InternalError(f"{type(error).__name__}: {error}"))
    return _finish(rt, ctx, SUCCEEDED, result=result)


def _end(rt: Runtime, ctx: JobContext, flow: Workflow, state: str, error: LaxError | None) -> str:
    """Undo the job's half-done work, then record how it ended."""
    if flow.cleanup is None:
        return _finish(rt, ctx, state, error=_with_left_behind(ctx, flow, error))
    if "cleanup" not in ctx.continuation:
        ctx.continuation["cleanup"] = {"state": state, "error": _error_as_dict(error)}
        ctx.report.update(phase="cleanup")
    ctx.enter_cleanup()
    try:
        flow.cleanup(ctx)
    except Suspended as suspended:
        return _suspend(rt, ctx, suspended)
    except Exception as cleanup_error:
        log.exception("cleanup of job %s failed", ctx.job_id)
        reason = f"; first: {error.message}" if error else ""
        failed = CleanupFailed(f"cleanup failed: {_message(cleanup_error)}{reason}")
        return _finish(rt, ctx, FAILED, error=_with_left_behind(ctx, flow, failed))
    return _finish(rt, ctx, state, error=error)


def _with_left_behind(ctx: JobContext, flow: Workflow, error: LaxError | None) -> LaxError | None:
    """The error, naming what the failed job left (and marking its target broken): nothing undid its work."""
    if flow.left_behind is None:
        return error
    try:
        left = flow.left_behind(ctx)
    except Exception:
        log.exception("recording what job %s left behind failed", ctx.job_id)
        return error
    if left and error is not None:
        error.message = f"{error.message}; left behind: {left}"
    return error


def _message(error: Exception) -> str:
    return error.message if isinstance(error, LaxError) else str(error)


def _finish(rt: Runtime, ctx: JobContext, state: str, *, result: dict[str, Any] | None = None,
            error: LaxError | None = None) -> str:
    with transaction(rt.sessions) as session:
        job = jobs.finish(session, jobs.owned(session, ctx.job_id, ctx.attempt), state, result=result, error=error)
        # A job that did not succeed (its worker lost, cancelled, failed) leaves no child running on its behalf.
        orphans = [] if state == SUCCEEDED else jobs.unfinished_children(session, ctx.job_id)
        for child in orphans:
            jobs.request_cancel(session, rt.redis, child.id)
        waiters = waiters_of(session, job)
    announce_if_possible(rt.redis, job)
    _wake_after_commit(rt, waiters)
    return state


def _wake_after_commit(rt: Runtime, waiters: list[str]) -> None:
    # Only once the end is committed: a waiter woken earlier would still see this job unfinished.
    if waiters:
        with transaction(rt.sessions) as session:
            wake_all(session, app, waiters)


def force_end(rt: Runtime, job_id: str, actor: str) -> Job:
    """End a stuck job and its descendants now (jobs.force_fail), marking what each leaves behind the way
    a failed run would (a VM goes to `error`, wanted deleted)."""
    with transaction(rt.sessions) as session:
        ended = jobs.force_fail(session, rt.redis, job_id, actor)
    for job in ended:
        flow = lookup(job.kind)
        if flow.left_behind is not None:
            ctx = JobContext(rt, app, job, Reporter(job.id, rt.sessions, rt.redis, 1.0, attempt=job.attempt))
            try:
                flow.left_behind(ctx)
            except Exception:
                log.exception("recording what job %s left behind failed", job.id)
        announce_if_possible(rt.redis, job)
        with transaction(rt.sessions) as session:
            wake_all(session, app, waiters_of(session, job))
    return ended[-1]


def _suspend(rt: Runtime, ctx: JobContext, suspended: Suspended) -> str:
    """Record what the job waits for and give the worker back; the children's ends resume it."""
    ctx.report.flush()
    with transaction(rt.sessions) as session:
        jobs.suspend(session, ctx.job_id, ctx.attempt, {**ctx.continuation, "wait": suspended.wait.as_dict()})
    return WAITING


def _error_as_dict(error: LaxError | None) -> dict[str, Any] | None:
    return None if error is None else {"code": error.code, "message": error.message, "extra": error.extra}


def _error_from(recorded: dict[str, Any] | None) -> LaxError | None:
    """The error a cleanup that waited was undoing, as it was when the cleanup began."""
    if recorded is None:
        return None
    error = LaxError(recorded["message"], **recorded["extra"])
    error.code = recorded["code"]
    return error


class Heartbeat:
    """Keeps `job:<id>:alive` fresh while the job runs; the reconciler treats its absence as a dead worker."""

    def __init__(self, rt: Runtime, job_id: str) -> None:
        self._redis = rt.redis
        self._key = alive_key(job_id)
        self._ttl = int(rt.config.section("jobs")["heartbeat_ttl_s"])
        self._stop = threading.Event()
        self.missed = 0
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._refresh()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with suppress(redis.RedisError):  # the key expires by itself
            self._redis.delete(self._key)

    def _beat(self) -> None:
        while not self._stop.wait(max(self._ttl / 4, 0.5)):
            self._refresh()

    def _refresh(self) -> None:
        # A Redis blip must not stop the beat: a job whose beat stopped looks dead and is run again.
        try:
            self._redis.set(self._key, "running", ex=self._ttl)
        except redis.RedisError as error:
            self.missed += 1
            log.warning("heartbeat of %s not refreshed: %s", self._key, error)
