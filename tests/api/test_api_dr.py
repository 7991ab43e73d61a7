"""DR over HTTP: enabling a VM's replication records it and starts its first ship as a job; every bad request is
a 4xx problem with a stable code that records nothing; status shows the newest replica's age against the
target; failover, failback and drill are jobs of a replicated VM only; metrics carry the RPO."""

from datetime import timedelta

import pytest
from sqlalchemy import select

from models import Job, San, VirtualMachine, utcnow
from models.db import transaction
from models.protection import ReplicaPoint, Replication
from tasks.control.replication_schedule import dispatch_due
from tests.fixtures import factories
from tests.fixtures.http import assert_problem, bearer


@pytest.fixture
def web1(rt) -> str:
    with transaction(rt.sessions) as session:
        factories.vm(session, "web1", template_row=factories.template(session), server="cs1", state="running",
                     disk_bytes=1 << 30)
    return "web1"


def enable(client, tokens, body, vm="web1"):
    return client.post(f"/vms/{vm}/replication", json=body, headers=bearer(tokens["operator"]))


def replications(rt) -> list[Replication]:
    with rt.sessions() as session:
        return list(session.scalars(select(Replication)))


def job_count(rt) -> int:
    with rt.sessions() as session:
        return session.query(Job).count()


def test_enabling_records_the_replication_to_the_other_site_and_starts_a_ship(rt, client, tokens, web1):
    response = enable(client, tokens, {"rpo_target_s": 30, "bandwidth_limit": "20M", "keep": 5})
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert (job["kind"], job["target"], job["params"]) == ("replicate-to-dr", "replicate/web1", {"vm": "web1"})
    (rep,) = replications(rt)
    with rt.sessions() as session:
        peer = session.get(San, rep.peer_san_id).name
    assert (peer, rep.mode, rep.rpo_target_s, rep.bandwidth_limit_bytes_s, rep.keep, rep.enabled) == (
        "san-b", "continuous", 30, 20 << 20, 5, True)
    status = client.get("/vms/web1/replication", headers=bearer(tokens["viewer"])).get_json()
    assert (status["state"], status["newest_point"], status["primary_site"], status["peer_san"]) == (
        "initial", None, "site-a", "san-b")


@pytest.mark.parametrize("body, status, code", [
    ({"mode": "hourly"}, 422, "InvalidInput"),
    ({"mode": "scheduled"}, 422, "InvalidInput"),
    ({"mode": "scheduled", "schedule": "every now and then"}, 422, "InvalidInput"),
    ({"mode": "continuous", "schedule": "*/5 * * * *"}, 422, "InvalidInput"),
    ({"rpo_target_s": 1}, 422, "InvalidInput"),
    ({"keep": 0}, 422, "InvalidInput"),
    ({"bandwidth_limit": "fast"}, 422, "InvalidInput"),
    ({"site": "site-a"}, 409, "NoDrSite"),
    ({"site": "site-z"}, 409, "NoDrSite"),
    ({"site": "../etc"}, 422, "InvalidInput"),
    ({"color": "red"}, 422, "InvalidInput"),
])
def test_a_bad_request_is_a_problem_and_records_nothing(rt, client, tokens, web1, body, status, code):
    assert_problem(enable(client, tokens, body), status, code)
    assert replications(rt) == [] and job_count(rt) == 0


def test_a_vm_is_replicated_once_and_a_viewer_cannot_enable(rt, client, tokens, web1):
    assert enable(client, tokens, {}).status_code == 202
    assert_problem(enable(client, tokens, {}), 409, "ReplicationExists")
    assert len(replications(rt)) == 1
    refused = client.post("/vms/web1/replication", json={}, headers=bearer(tokens["viewer"]))
    assert refused.status_code == 403


@pytest.mark.parametrize("path, body", [("failover", {}), ("failback", {}), ("drill", {}), ("replication", None)])
def test_dr_actions_need_a_replicated_vm(rt, client, tokens, web1, path, body):
    if body is None:
        response = client.get(f"/vms/web1/{path}", headers=bearer(tokens["viewer"]))
    else:
        response = client.post(f"/vms/web1/{path}", json=body, headers=bearer(tokens["operator"]))
    assert_problem(response, 404, "ReplicationNotEnabled")
    assert_problem(client.post("/vms/nosuch/failover", json={}, headers=bearer(tokens["operator"])), 404, "VmNotFound")


def test_failover_failback_and_drill_of_a_replicated_vm_are_jobs(rt, client, tokens, web1):
    assert enable(client, tokens, {}).status_code == 202
    for path, body, params in [("failover", {"planned": False, "point": "rep-1"}, {"planned": False, "point": "rep-1"}),
                               ("drill", {"server": "cs3"}, {"server": "cs3"})]:
        response = client.post(f"/vms/web1/{path}", json=body, headers=bearer(tokens["operator"]))
        assert response.status_code == 202, response.get_json()
        assert response.get_json()["params"] == {"vm": "web1", **params}
    assert_problem(client.post("/vms/web1/failover", json={"planned": "yes"}, headers=bearer(tokens["operator"])),
                   422, "InvalidInput")


def record_point(rt, age_s: float) -> None:
    with transaction(rt.sessions) as session:
        rep = session.scalar(select(Replication))
        session.add(ReplicaPoint(replication_id=rep.id, name="rep-1", san_id=rep.peer_san_id,
                                 taken_at=utcnow() - timedelta(seconds=age_s)))


@pytest.mark.parametrize("age_s, state, alert", [(5, "ok", 0), (300, "alert", 1)])
def test_status_and_metrics_compare_the_newest_replica_with_the_target(rt, client, tokens, web1, age_s, state, alert):
    assert enable(client, tokens, {"rpo_target_s": 60}).status_code == 202
    record_point(rt, age_s)
    status = client.get("/vms/web1/replication", headers=bearer(tokens["viewer"])).get_json()
    assert (status["state"], status["newest_point"]) == (state, "rep-1")
    assert age_s <= status["rpo_s"] < age_s + 30
    listing = client.get("/replications", headers=bearer(tokens["viewer"])).get_json()
    assert [r["vm"] for r in listing] == ["web1"]
    metrics = client.get("/metrics", headers=bearer(tokens["viewer"])).get_data(as_text=True)
    assert f'laxcluster_replication_alert{{vm="web1"}} {float(alert)}' in metrics


def replicate(rt, vm: str, **fields) -> None:
    with transaction(rt.sessions) as session:
        vm_id = session.scalar(select(VirtualMachine.id).where(VirtualMachine.name == vm))
        san_b = session.scalar(select(San.id).where(San.name == "san-b"))
        session.add(Replication(vm_id=vm_id, peer_san_id=san_b, rpo_target_s=60, **fields))


@pytest.mark.parametrize("mode, schedule, later_s", [("continuous", None, 6), ("scheduled", "*/10 * * * *", 600)])
def test_the_dispatcher_starts_a_due_ship_once_at_a_time(rt, celery_app, client, web1, mode, schedule, later_s):
    replicate(rt, web1, mode=mode, schedule=schedule)
    (first,) = dispatch_due(rt, celery_app)
    # The ship's job holds the VM's replication lock until it ends: a later tick starts no second one.
    assert dispatch_due(rt, celery_app, now=utcnow() + timedelta(seconds=later_s)) == []
    with rt.sessions() as session:
        assert (session.get(Job, first).kind, session.get(Job, first).target) == ("replicate-to-dr", "replicate/web1")


def test_the_dispatcher_leaves_a_paused_replication_and_one_not_yet_due(rt, celery_app, client, web1):
    replicate(rt, web1, mode="continuous", enabled=False)
    assert dispatch_due(rt, celery_app) == []
    with transaction(rt.sessions) as session:
        rep = session.scalar(select(Replication))
        rep.enabled, rep.last_attempt_at = True, utcnow()
    assert dispatch_due(rt, celery_app) == []
    assert len(dispatch_due(rt, celery_app, now=utcnow() + timedelta(seconds=10))) == 1
