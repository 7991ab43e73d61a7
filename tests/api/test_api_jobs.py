"""Jobs through the API: submit, conflicts, idempotency, cancel, audit, the broker being down, SSE."""

import json

from sqlalchemy import func, select

from api import create_app
from errors import WorkerLost
from lab.processes import free_port, wait_until
from models import FAILED, AuditEvent, Job, JobLock
from models.db import transaction
from tasks import jobs
from tasks.app import make_celery
from tasks.queues import CONTROL
from tests.fixtures.http import bearer


def post_noop(client, token, key=None, **body):
    headers = {**bearer(token), **({"Idempotency-Key": key} if key else {})}
    return client.post("/jobs/noop", json=body, headers=headers)


def job_row(rt, job_id) -> Job:
    with rt.sessions() as session:
        return session.get(Job, job_id)


def sse_events(response) -> list[dict]:
    """The `data:` payloads of an SSE body, in order."""
    frames = response.get_data(as_text=True).split("\n\n")
    return [json.loads(line[len("data: "):]) for frame in frames for line in frame.splitlines() if line.startswith("data: ")]


def test_a_change_answers_202_with_the_job_and_its_location(rt, client, tokens):
    response = post_noop(client, tokens["admin"], seconds=0.5, steps=2)
    assert response.status_code == 202
    job = response.get_json()
    assert response.headers["Location"] == f"/jobs/{job['id']}"
    assert job["state"] == "queued" and job["kind"] == "noop" and job["requested_by"] == "test-admin"
    assert job["params"] == {"seconds": 0.5, "steps": 2}
    shown = client.get(response.headers["Location"], headers=bearer(tokens["viewer"])).get_json()
    assert shown["id"] == job["id"] and job_row(rt, job["id"]).queue == CONTROL


def test_a_busy_target_is_409_naming_the_holder(client, tokens):
    first = client.post("/servers/refresh", headers=bearer(tokens["operator"]))
    assert first.status_code == 202
    second = client.post("/servers/refresh", headers=bearer(tokens["operator"]))
    assert second.status_code == 409 and second.mimetype == "application/problem+json"
    problem = second.get_json()
    assert problem["code"] == "TargetBusy" and problem["job_id"] == first.get_json()["id"]
    assert problem["target"] == "servers"
    assert post_noop(client, tokens["admin"], target="same").status_code == 202
    assert post_noop(client, tokens["admin"], target="same").get_json()["code"] == "TargetBusy"


def test_the_same_idempotency_key_gives_the_same_job(rt, client, tokens):
    first = post_noop(client, tokens["admin"], key="bench-run-1", seconds=1)
    again = post_noop(client, tokens["admin"], key="bench-run-1", seconds=1)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
    different = post_noop(client, tokens["admin"], key="bench-run-1", seconds=2)
    assert different.status_code == 422 and different.get_json()["code"] == "IdempotencyKeyReused"
    refresh = client.post("/servers/refresh", headers={**bearer(tokens["operator"]), "Idempotency-Key": "r1"})
    refresh_again = client.post("/servers/refresh", headers={**bearer(tokens["operator"]), "Idempotency-Key": "r1"})
    assert (refresh.status_code, refresh_again.status_code) == (202, 200)


def test_changes_are_audited_with_actor_action_target_and_source(rt, client, tokens):
    job = post_noop(client, tokens["admin"], target="audited").get_json()
    client.post(f"/jobs/{job['id']}/cancel", headers=bearer(tokens["operator"]))
    client.post("/servers/refresh", headers=bearer(tokens["viewer"]))  # refused: no change, no audit
    with rt.sessions() as session:
        events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    assert [(e.actor, e.action, e.target, e.source_ip) for e in events] == [
        ("test-admin", "job.noop", "noop/audited", "127.0.0.1"),
        ("test-operator", "job.cancel", "noop/audited", "127.0.0.1"),
    ]
    assert events[0].details["job_id"] == job["id"]


def test_a_cancelled_queued_job_never_starts(rt, client, tokens, celery_worker):
    job = post_noop(client, tokens["admin"], seconds=5).get_json()
    response = client.post(f"/jobs/{job['id']}/cancel", headers=bearer(tokens["operator"]))
    assert response.status_code == 200 and response.get_json()["state"] == "cancelled"
    again = client.post(f"/jobs/{job['id']}/cancel", headers=bearer(tokens["operator"]))
    assert again.status_code == 409 and again.get_json()["code"] == "JobFinished"
    worker = celery_worker([CONTROL])
    wait_until(lambda: "'stale'" in worker.log.read_text(), 30, "the worker to receive and drop the cancelled job")
    row = job_row(rt, job["id"])
    assert row.state == "cancelled" and row.started_at is None and row.attempt == 0
    events = sse_events(client.get(f"/jobs/{job['id']}/events", headers=bearer(tokens["viewer"])))
    assert [e["state"] for e in events] == ["queued", "cancelled"]


def test_a_job_the_broker_cannot_take_fails_with_503(rt, client, tokens):
    cut_off = make_celery(rt.config)
    cut_off.conf.broker_url = f"redis://127.0.0.1:{free_port()}/0"
    try:
        app = create_app(rt, cut_off)
        response = post_noop(app.test_client(), tokens["admin"], target="nowhere")
    finally:
        cut_off.close()
    assert response.status_code == 503 and response.get_json()["code"] == "BrokerUnavailable"
    row = job_row(rt, response.get_json()["job_id"])
    assert (row.state, row.error_code) == ("failed", "BrokerUnavailable")
    with rt.sessions() as session:
        assert session.get(JobLock, "noop/nowhere") is None


def test_events_stream_history_then_live_until_final(rt, client, tokens, celery_worker):
    celery_worker([CONTROL])
    job = post_noop(client, tokens["admin"], seconds=2, steps=4).get_json()
    wait_until(lambda: job_row(rt, job["id"]).state == "running", 30, "the noop job to start")
    response = client.get(f"/jobs/{job['id']}/events", headers=bearer(tokens["viewer"]))
    assert response.mimetype == "text/event-stream"
    events = sse_events(response)
    states = [e["state"] for e in events]
    assert states[0] == "queued" and states[-1] == "succeeded" and "running" in states
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    progress = [e["progress"] for e in events if e["state"] == "running"]
    assert progress == sorted(progress) and progress[-1] > progress[0]
    assert events[-1]["progress"] == 100
    resumed = client.get(f"/jobs/{job['id']}/events", headers={**bearer(tokens["viewer"]), "Last-Event-ID": str(seqs[-2])})
    assert [e["seq"] for e in sse_events(resumed)] == [seqs[-1]]


def test_events_of_a_finished_job_without_history_come_from_the_db(rt, client, tokens):
    job = post_noop(client, tokens["admin"]).get_json()
    client.post(f"/jobs/{job['id']}/cancel", headers=bearer(tokens["operator"]))
    rt.redis.delete(f"job:{job['id']}:log")
    events = sse_events(client.get(f"/jobs/{job['id']}/events", headers=bearer(tokens["viewer"])))
    assert len(events) == 1 and events[0]["state"] == "cancelled" and events[0]["source"] == "db"


def test_a_quiet_stream_keeps_alive_and_notices_an_end_only_the_db_knows(rt, client, tokens):
    job = post_noop(client, tokens["admin"]).get_json()
    response = client.get(f"/jobs/{job['id']}/events", headers=bearer(tokens["viewer"]))
    chunks = iter(response.response)
    received = [next(chunks).decode() for _ in range(2)]
    assert received[0].startswith("retry:") and '"state": "queued"' in received[1]
    assert next(chunks).decode() == ": keep-alive\n\n"
    with transaction(rt.sessions) as session:  # ended without an event, as a reconciler might
        jobs.finish(session, jobs.get(session, job["id"]), FAILED, error=WorkerLost("gone"))
    rest = "".join(chunk.decode() for chunk in chunks)
    final = json.loads(rest.split("data: ")[-1])
    assert (final["state"], final["error"]["code"], final["source"]) == ("failed", "WorkerLost", "db")
    response.close()


def test_jobs_list_filters(client, tokens):
    noop = post_noop(client, tokens["admin"]).get_json()
    refresh = client.post("/servers/refresh", headers=bearer(tokens["operator"])).get_json()
    client.post(f"/jobs/{noop['id']}/cancel", headers=bearer(tokens["operator"]))
    auth = bearer(tokens["viewer"])

    def ids(query):
        return [job["id"] for job in client.get(f"/jobs{query}", headers=auth).get_json()["items"]]

    assert set(ids("")) == {noop["id"], refresh["id"]}
    assert ids("?kind=refresh-servers") == [refresh["id"]]
    assert ids("?target=servers") == [refresh["id"]]
    assert ids(f"?target={noop['target']}") == ids(f"?target={noop['target'].removeprefix('noop/')}") == [noop["id"]]
    assert ids("?target=rvers") == []
    assert ids("?state=cancelled") == [noop["id"]]
    assert len(ids("?limit=1")) == 1
