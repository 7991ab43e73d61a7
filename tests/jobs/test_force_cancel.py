"""An admin can end a stuck job (its worker died, nothing consumes its queue) and free its lock."""

from sqlalchemy import select

from lab.processes import wait_until
from models import FAILED, RUNNING, Job, JobLock
from models.db import transaction
from tasks import jobs
from tasks.dispatch import alive_key, dispatch
from tasks.queues import CONTROL
from tests.fixtures.http import assert_problem, bearer


def stuck_noop(rt, celery_app, celery_worker) -> tuple[Job, object]:
    """A running noop holding vm/stuck whose worker was killed -9 (no other worker reads `control`)."""
    worker = celery_worker([CONTROL])
    with transaction(rt.sessions) as session:
        job, _ = jobs.submit(session, kind="noop", target="vm/stuck", queue=CONTROL, params={"seconds": 60, "steps": 60})
    dispatch(celery_app, job)
    wait_until(lambda: rt.redis.get(alive_key(job.id)) == "running", 30, "the noop to run")
    return job, worker


def test_an_admin_force_cancels_a_stuck_job_and_frees_its_lock(rt, client, tokens, celery_app, celery_worker):
    job, worker = stuck_noop(rt, celery_app, celery_worker)
    assert_problem(client.post(f"/jobs/{job.id}/force-cancel", headers=bearer(tokens["admin"])), 409, "JobAlive")
    worker.kill()
    wait_until(lambda: not rt.redis.exists(alive_key(job.id)), 30, "the heartbeat of the dead worker to lapse")
    with rt.sessions() as session:
        assert session.get(Job, job.id).state == RUNNING and session.get(JobLock, "vm/stuck") is not None

    assert_problem(client.post(f"/jobs/{job.id}/force-cancel", headers=bearer(tokens["operator"])), 403, "Forbidden")
    response = client.post(f"/jobs/{job.id}/force-cancel", headers=bearer(tokens["admin"]))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert (response.get_json()["state"], response.get_json()["error"]["code"]) == (FAILED, "ForceCancelled")
    with rt.sessions() as session:
        assert session.get(JobLock, "vm/stuck") is None
        assert session.scalar(select(Job.error_code).where(Job.id == job.id)) == "ForceCancelled"
    assert_problem(client.post(f"/jobs/{job.id}/force-cancel", headers=bearer(tokens["admin"])), 409, "JobFinished")
