"""A parent job waiting for its children holds no Celery worker slot: it suspends, and the children's
ends resume it. Real Celery workers; the child (a migration pre-flight) asks libvirt's test driver."""

from datetime import timedelta

from sqlalchemy import select, update

from lab.processes import wait_until
from models import CANCELLED, SUCCEEDED, ClusterServer, Job, JobLock
from models.db import transaction
from tasks import jobs, submission
from tasks.inventory.config_sync import sync_from_config
from tasks.queues import CONTROL, node_queue
from tests.fixtures import factories
from tests.support import TEST_DRIVER_UUID

TESTER = submission.Requester("test")
CHECK = {"vm": "test", "to": "cs2", "check": True}


def vm_on_test_driver(rt) -> None:
    """VM `test` (the test driver's running domain) placed on cs1; cs1 and cs2 both on the test driver."""
    with transaction(rt.sessions) as session:
        sync_from_config(session, rt.config)
        session.execute(update(ClusterServer).values(libvirt_uri="test:///default"))
        factories.vm(session, "test", server="cs1", state="running", uuid=TEST_DRIVER_UUID)


def job(rt, job_id: str) -> Job:
    with rt.sessions() as session:
        return session.get(Job, job_id)


def children_of(rt, job_id: str) -> list[Job]:
    with rt.sessions() as session:
        return list(session.scalars(select(Job).where(Job.parent_id == job_id)))


def final(rt, job_id: str, timeout: float = 60) -> Job:
    return wait_until(lambda: (j := job(rt, job_id)).is_final and j, timeout, f"job {job_id} to end")


def test_a_waiting_parent_frees_the_only_control_slot_and_resumes_when_its_child_ends(rt, celery_app, celery_worker):
    vm_on_test_driver(rt)
    celery_worker([CONTROL], concurrency=1)
    parent = submission.start(rt, celery_app, "migrate", CHECK, TESTER)
    wait_until(lambda: job(rt, parent.id).waiting, 30, "the parent to wait for its pre-flight child")

    # No worker serves node.cs1 yet, so the child is queued; the one control slot is free all the same.
    other = submission.start(rt, celery_app, "noop", {"steps": 1}, TESTER, target="noop/beside")
    assert final(rt, other.id).state == SUCCEEDED
    assert job(rt, parent.id).state == "running"

    celery_worker([node_queue("cs1")])
    done = final(rt, parent.id)
    assert done.state == SUCCEEDED, done.error_message
    assert "DomainExists" in {problem["code"] for problem in done.result["problems"]}
    # A resume is not a new attempt: only a crash counts toward max_attempts.
    assert (done.attempt, done.waiting, done.progress) == (1, False, 100.0)
    (child,) = children_of(rt, parent.id)
    assert (child.kind, child.state, child.result["problems"]) == ("preflight-migration", SUCCEEDED,
                                                                    done.result["problems"])


def test_cancelling_a_waiting_parent_cancels_its_queued_child_and_ends_it(rt, celery_app, celery_worker):
    vm_on_test_driver(rt)
    celery_worker([CONTROL], concurrency=1)
    parent = submission.start(rt, celery_app, "migrate", CHECK, TESTER)
    wait_until(lambda: job(rt, parent.id).waiting, 30, "the parent to wait for its pre-flight child")

    submission.cancel(rt, celery_app, parent.id)
    assert final(rt, parent.id).state == CANCELLED
    assert [child.state for child in children_of(rt, parent.id)] == [CANCELLED]
    with rt.sessions() as session:
        assert session.scalars(select(JobLock)).all() == []


def test_a_parent_whose_wake_up_was_lost_with_its_worker_is_resumed_by_the_reconciler(rt, celery_app, celery_worker):
    vm_on_test_driver(rt)
    control = celery_worker([CONTROL], concurrency=1)
    parent = submission.start(rt, celery_app, "migrate", CHECK, TESTER)
    wait_until(lambda: job(rt, parent.id).waiting, 30, "the parent to wait for its pre-flight child")
    control.kill()

    celery_worker([node_queue("cs1")])
    wait_until(lambda: all(child.is_final for child in children_of(rt, parent.id)), 60, "the child to end")
    with celery_app.connection_for_write() as connection:
        connection.default_channel.queue_purge(CONTROL)  # the wake-up message is lost with the broker's queue
    assert job(rt, parent.id).waiting

    celery_worker([CONTROL], concurrency=1, beat=True)
    done = final(rt, parent.id)
    assert done.state == SUCCEEDED, done.error_message
    assert "DomainExists" in {problem["code"] for problem in done.result["problems"]}


def test_a_child_that_runs_out_of_time_is_cancelled_and_its_parent_fails(rt, celery_app, celery_worker):
    vm_on_test_driver(rt)
    celery_worker([CONTROL], concurrency=1, beat=True)
    parent = submission.start(rt, celery_app, "migrate", CHECK, TESTER)
    wait_until(lambda: job(rt, parent.id).waiting, 30, "the parent to wait for its pre-flight child")

    # No worker serves node.cs1: let the child's time run out (it started long ago, by its row).
    (child,) = children_of(rt, parent.id)
    long_ago = child.created_at - timedelta(hours=2)
    with transaction(rt.sessions) as session:
        session.get(Job, child.id).created_at = long_ago
        waiting = session.get(Job, parent.id)
        waiting.continuation = {**waiting.continuation,
                                "wait": {**waiting.continuation["wait"], "deadline": long_ago.isoformat()}}
    failed = final(rt, parent.id)
    assert (failed.state, failed.error_code) == ("failed", "ChildrenTimedOut")
    assert [c.state for c in children_of(rt, parent.id)] == [CANCELLED]
    with rt.sessions() as session:
        assert session.scalars(select(JobLock)).all() == []


def test_a_parent_whose_worker_died_after_taking_it_up_again_is_ended_and_its_child_cancelled(
        rt, celery_app, celery_worker):
    vm_on_test_driver(rt)
    control = celery_worker([CONTROL], concurrency=1)
    parent = submission.start(rt, celery_app, "migrate", CHECK, TESTER)
    wait_until(lambda: job(rt, parent.id).waiting, 30, "the parent to wait for its pre-flight child")
    control.kill()
    # What a worker killed -9 right after claiming the resume leaves behind: running, not waiting, no heartbeat.
    with transaction(rt.sessions) as session:
        assert jobs.claim_resume(session, parent.id, job(rt, parent.id).attempt, "killed") is not None

    celery_worker([CONTROL], concurrency=1, beat=True)
    ended = final(rt, parent.id)
    # migrate does not run twice: the reconciler runs its cleanup and ends it WorkerLost.
    assert (ended.state, ended.error_code) == ("failed", "WorkerLost")
    assert [child.state for child in children_of(rt, parent.id)] == [CANCELLED]
    with rt.sessions() as session:
        assert session.scalars(select(JobLock)).all() == []
