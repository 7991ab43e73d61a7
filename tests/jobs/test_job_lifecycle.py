"""The job spine end to end: DB rows, locks, real Celery workers, progress in Redis, cancel, crash recovery."""

import json

import pytest
from sqlalchemy import select

from errors import TargetBusy
from lab.processes import wait_until
from models import CANCELLED, FAILED, RUNNING, SUCCEEDED, Job, JobLock
from models.db import transaction
from tasks import jobs
from tasks.dispatch import dispatch
from tasks.progress import Reporter, log_key
from tasks.queues import CONTROL


def submit_noop(rt, target="vm/t1", key=None, **params) -> Job:
    with transaction(rt.sessions) as session:
        job, _ = jobs.submit(session, kind="noop", target=target, queue=CONTROL, params=params, idempotency_key=key)
    return job


def state_of(rt, job_id: str) -> Job:
    with rt.sessions() as session:
        return session.get(Job, job_id)


def final(rt, job_id: str, timeout: float = 30) -> Job:
    return wait_until(lambda: (j := state_of(rt, job_id)).is_final and j, timeout, f"job {job_id} to end")


def test_a_target_is_locked_until_its_job_ends(rt):
    first = submit_noop(rt)
    with pytest.raises(TargetBusy) as busy, transaction(rt.sessions) as session:
        jobs.submit(session, kind="noop", target="vm/t1", queue=CONTROL)
    assert busy.value.extra["job_id"] == first.id
    assert busy.value.http_status == 409
    with transaction(rt.sessions) as session:
        jobs.finish(session, jobs.get(session, first.id), SUCCEEDED)
    second = submit_noop(rt)
    assert second.id != first.id


def test_same_idempotency_key_gives_the_same_job(rt):
    first = submit_noop(rt, key="req-1")
    with transaction(rt.sessions) as session:
        again, created = jobs.submit(session, kind="noop", target="vm/t1", queue=CONTROL, idempotency_key="req-1")
    assert (again.id, created) == (first.id, False)
    with rt.sessions() as session:
        assert len(session.scalars(select(Job)).all()) == 1


def test_a_stale_message_cannot_run_a_job_twice(rt):
    job = submit_noop(rt)
    with transaction(rt.sessions) as session:
        assert jobs.claim(session, job.id, 0, "w1").attempt == 1
    with transaction(rt.sessions) as session:
        assert jobs.claim(session, job.id, 0, "w2") is None


def test_a_cancelled_queued_job_never_starts(rt, celery_worker, celery_app):
    job = submit_noop(rt)
    with transaction(rt.sessions) as session:
        assert jobs.request_cancel(session, rt.redis, job.id).state == CANCELLED
    dispatch(celery_app, job)
    celery_worker([CONTROL])
    marker = submit_noop(rt, target="vm/other")
    dispatch(celery_app, marker)
    final(rt, marker.id)
    cancelled = state_of(rt, job.id)
    assert (cancelled.state, cancelled.attempt, cancelled.started_at) == (CANCELLED, 0, None)
    with rt.sessions() as session:
        assert session.get(JobLock, "vm/t1") is None


def test_a_worker_runs_a_job_and_reports_progress(rt, celery_worker, celery_app):
    celery_worker([CONTROL])
    job = submit_noop(rt, seconds=0.5, steps=5)
    dispatch(celery_app, job)
    done = final(rt, job.id)
    assert done.state == SUCCEEDED and done.progress == 100.0
    assert done.result == {"steps": 5, "attempt": 1}
    events = [json.loads(e) for e in rt.redis.lrange(log_key(job.id), 0, -1)]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert events[0]["state"] == RUNNING and events[-1]["state"] == SUCCEEDED
    assert [e["phase"] for e in events if e["phase"].startswith("step")][:5] == [f"step {i}/5" for i in range(1, 6)]
    with rt.sessions() as session:
        assert session.get(JobLock, "vm/t1") is None


def test_cancel_stops_a_running_job_at_its_next_check(rt, celery_worker, celery_app):
    celery_worker([CONTROL])
    job = submit_noop(rt, seconds=30, steps=300)
    dispatch(celery_app, job)
    wait_until(lambda: state_of(rt, job.id).state == RUNNING, 30, "job to run")
    with transaction(rt.sessions) as session:
        assert jobs.request_cancel(session, rt.redis, job.id).state == RUNNING
    ended = final(rt, job.id, timeout=10)
    assert ended.state == CANCELLED and ended.progress < 100


def test_reporter_writes_redis_always_and_the_db_at_most_once_a_second(rt):
    job = submit_noop(rt)
    reporter = Reporter(job.id, rt.sessions, rt.redis, db_interval=5.0)
    for percent in range(1, 51):
        reporter.update(progress=percent, bytes_done=percent * 1000, bytes_total=50_000)
    assert json.loads(rt.redis.hget(f"job:{job.id}", "progress")) == 50
    assert state_of(rt, job.id).progress == 1
    reporter.update(phase="next")
    assert state_of(rt, job.id).progress == 50 and state_of(rt, job.id).phase == "next"


def test_a_job_whose_worker_is_killed_is_run_again(rt, celery_worker, celery_app):
    first = celery_worker([CONTROL])
    job = submit_noop(rt, seconds=4, steps=20)
    dispatch(celery_app, job)
    wait_until(lambda: state_of(rt, job.id).phase.startswith("step 3"), 30, "job to be under way")
    first.kill()
    celery_worker([CONTROL], beat=True)
    done = final(rt, job.id, timeout=60)
    assert done.state == SUCCEEDED
    assert done.result["attempt"] == 2


def test_a_job_out_of_attempts_is_rolled_back_and_failed(rt, lax_env, celery_worker, celery_app):
    lax_env["LAXCLUSTER_JOBS_MAX_ATTEMPTS"] = "1"
    first = celery_worker([CONTROL])
    job = submit_noop(rt, seconds=30, steps=300)
    dispatch(celery_app, job)
    wait_until(lambda: state_of(rt, job.id).state == RUNNING, 30, "job to run")
    first.kill()
    celery_worker([CONTROL], beat=True)
    done = final(rt, job.id, timeout=60)
    assert (done.state, done.error_code) == (FAILED, "WorkerLost")
    with rt.sessions() as session:
        assert session.get(JobLock, "vm/t1") is None
