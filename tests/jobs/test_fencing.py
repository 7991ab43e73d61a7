"""A run that lost its job to a newer attempt writes nothing more about it, and a heartbeat outlives
Redis errors (a stopped beat makes a running job look dead and run twice)."""

from dataclasses import replace

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lab.processes import free_port, wait_until
from models import RUNNING, SUCCEEDED, Job, JobLock
from models.db import transaction
from tasks import jobs, submission
from tasks.runner import Heartbeat, execute
from tasks.workflow import lookup

TESTER = submission.Requester("test")


def noop_claimed_twice(rt) -> tuple[Job, Job]:
    """A noop claimed by a first run, then again by a second (the reconciler's rerun of a job it thought orphaned)."""
    with transaction(rt.sessions) as session:
        job, _ = submission.submit(session, "noop", {"steps": 2}, TESTER, target="noop/fenced")
    with transaction(rt.sessions) as session:
        first = jobs.claim(session, job.id, 0, "first")
    with transaction(rt.sessions) as session:
        second = jobs.claim(session, job.id, first.attempt, "second")
    return first, second


def row(rt, job_id: str) -> tuple[str, int, str | None]:
    with rt.sessions() as session:
        job = session.get(Job, job_id)
        return job.state, job.attempt, session.get(JobLock, "noop/fenced") and job.id


def test_a_run_that_lost_its_job_to_a_newer_attempt_stops_and_writes_nothing(rt):
    first, second = noop_claimed_twice(rt)
    with pytest.raises(jobs.StaleRun):
        execute(rt, first, lookup("noop"))
    assert row(rt, first.id) == (RUNNING, 2, first.id)  # still the second run's, lock held

    assert execute(rt, second, lookup("noop")) == SUCCEEDED
    assert row(rt, first.id)[:2] == (SUCCEEDED, 2)


def test_a_stale_run_cannot_finish_or_suspend_the_job(rt):
    first, _ = noop_claimed_twice(rt)
    for write in (lambda s: jobs.finish(s, jobs.owned(s, first.id, first.attempt), SUCCEEDED),
                  lambda s: jobs.suspend(s, first.id, first.attempt, {"wait": {}})):
        with pytest.raises(jobs.StaleRun), transaction(rt.sessions) as session:
            write(session)
    with rt.sessions() as session:
        job = session.get(Job, first.id)
        assert (job.state, job.waiting, job.continuation) == (RUNNING, False, {})


def test_a_heartbeat_keeps_beating_through_redis_errors(rt):
    unreachable = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    beat = Heartbeat(replace(rt, redis=unreachable), "job-without-redis")
    with beat:
        wait_until(lambda: beat.missed >= 3, 20, "the heartbeat to miss three refreshes")
        assert beat._thread.is_alive()
