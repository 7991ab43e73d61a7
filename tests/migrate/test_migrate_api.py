"""migrate, evacuate, fence and activate over HTTP: validated at the edge, jobs on the right locks, audited."""

from sqlalchemy import select

from models import AuditEvent, ClusterServer
from models.db import transaction
from tests.fixtures import factories
from tests.fixtures.http import assert_problem, bearer


def test_migrate_is_a_job_on_the_vms_lock_with_checked_parameters(rt, client, tokens):
    with transaction(rt.sessions) as session:
        factories.vm(session, "web1", server="cs1", state="running")
    operator = bearer(tokens["operator"])
    response = client.post("/vms/web1/actions/migrate", json={"to": "cs2", "check": True}, headers=operator)
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert (job["kind"], job["target"], job["queue"]) == ("migrate", "vm/web1", "control")
    assert job["params"] == {"vm": "web1", "to": "cs2", "live": True, "check": True}
    assert assert_problem(client.post("/vms/web1/actions/migrate", headers=operator), 409, "TargetBusy")["job_id"] == job["id"]
    client.post(f"/jobs/{job['id']}/cancel", headers=operator)
    for body, field in (({"live": "yes"}, "live"), ({"to": "CS 2"}, "to"), ({"bandwidth_mib_s": 0}, "bandwidth_mib_s"),
                        ({"timeout_s": 5}, "timeout_s")):
        assert assert_problem(client.post("/vms/web1/actions/migrate", json=body, headers=operator),
                              422, "InvalidInput")["field"] == field
    offline = client.post("/vms/web1/actions/migrate", json={"live": False}, headers=operator).get_json()
    assert offline["params"] == {"vm": "web1", "live": False, "check": False}


def test_evacuate_fence_and_activate_are_jobs_on_the_servers_lock(rt, client, tokens):
    operator = bearer(tokens["operator"])
    response = client.post("/servers/cs1/actions/evacuate", headers=operator)
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert (job["kind"], job["target"], job["queue"], job["params"]) == ("evacuate", "server/cs1", "control", {"server": "cs1"})
    assert assert_problem(client.post("/servers/cs1/actions/activate", headers=operator), 409, "TargetBusy")["job_id"] == job["id"]
    client.post(f"/jobs/{job['id']}/cancel", headers=operator)
    with transaction(rt.sessions) as session:
        session.scalar(select(ClusterServer).where(ClusterServer.name == "cs1")).maintenance = True
    for action, kind in (("activate", "activate-server"), ("fence", "fence-server")):
        started = client.post(f"/servers/cs1/actions/{action}", headers=operator)
        assert started.status_code == 202, started.get_data(as_text=True)
        assert (started.get_json()["kind"], started.get_json()["target"]) == (kind, "server/cs1")
        client.post(f"/jobs/{started.get_json()['id']}/cancel", headers=operator)
    assert started.get_json()["queue"] == "san.site-a"
    with rt.sessions() as session:
        assert session.scalar(select(AuditEvent.actor).where(AuditEvent.action == "server.activate")) == "test-operator"
        assert session.scalar(select(AuditEvent.actor).where(AuditEvent.action == "server.fence")) == "test-operator"
    for action in ("evacuate", "fence", "activate"):
        assert_problem(client.post(f"/servers/ghost/actions/{action}", headers=operator), 404, "ServerNotFound")
        assert_problem(client.post(f"/servers/cs1/actions/{action}", headers=bearer(tokens["viewer"])), 403, "Forbidden")
    assert_problem(client.post("/servers/cs1/actions/fence", json={"force": True}, headers=operator), 422, "InvalidInput")
