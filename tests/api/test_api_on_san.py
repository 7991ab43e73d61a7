"""`POST /vms/<name>/actions/start` with `on_san` over HTTP: a start job for a stopped VM (or one on a fenced
server), a stable 409 for every state that does not allow it, and a VM in maintenance neither starts on a server,
moves nor gets a disk; the overview shows it active, on its SAN."""

from pathlib import Path

import pytest

from config import SanConfig
from errors import NoSanHost
from models import ClusterServer, Job, VirtualMachine, utcnow
from models.db import transaction
from tasks.san.maintenance import host_uri
from tests.fixtures import factories
from tests.fixtures.http import assert_problem, bearer


def vm_in(rt, state: str, fenced: bool = False) -> str:
    with transaction(rt.sessions) as session:
        factories.vm(session, "web1", template_row=factories.template(session), server="cs1", state=state,
                     disk_bytes=1 << 30)
        if fenced:
            session.query(ClusterServer).filter_by(name="cs1").one().fenced_at = utcnow()
    return "web1"


def act(client, tokens, action: str, body=None, vm="web1"):
    return client.post(f"/vms/{vm}/actions/{action}", json=body or {}, headers=bearer(tokens["operator"]))


def jobs(rt) -> int:
    with rt.sessions() as session:
        return session.query(Job).count()


@pytest.mark.parametrize("state, fenced", [("shut off", False), ("crashed", False), ("running", True)])
def test_a_stopped_vm_or_one_on_a_fenced_server_starts_on_its_san_host(rt, client, tokens, state, fenced):
    vm_in(rt, state, fenced)
    response = act(client, tokens, "start", {"on_san": True})
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert (job["kind"], job["target"], job["params"]) == ("start", "vm/web1", {"vm": "web1", "on_san": True})


@pytest.mark.parametrize("state, code", [
    ("running", "VmIsRunning"),
    ("installing", "VmIsRunning"),
    ("rescue", "VmInRescue"),
    ("maintenance", "VmInMaintenance"),
])
def test_a_state_that_does_not_allow_it_is_409_and_makes_no_job(rt, client, tokens, state, code):
    vm_in(rt, state)
    assert_problem(act(client, tokens, "start", {"on_san": True}), 409, code)
    assert jobs(rt) == 0


@pytest.mark.parametrize("action, path", [("start", "actions/start"), ("migrate", "actions/migrate"),
                                          ("add a disk", "disks")])
def test_a_vm_in_maintenance_neither_starts_on_a_server_nor_moves_nor_gets_a_disk(rt, client, tokens, action, path):
    vm_in(rt, "maintenance")
    body = {"size": "1G"} if path == "disks" else {}
    assert_problem(client.post(f"/vms/web1/{path}", json=body, headers=bearer(tokens["operator"])), 409,
                   "VmInMaintenance")
    assert jobs(rt) == 0


def test_the_overview_shows_a_vm_in_maintenance_active_on_its_san(rt, client, tokens):
    vm_in(rt, "maintenance")
    overview = client.get("/vms", headers=bearer(tokens["viewer"])).get_json()
    assert [(vm["name"], vm["server"], vm["host"]) for vm in overview["active"]] == [("web1", "cs1", "san-a")]
    assert overview["inactive"] == []


def test_bad_requests_are_refused_before_any_job(rt, client, tokens):
    vm_in(rt, "shut off")
    assert_problem(act(client, tokens, "start", {"on_san": "yes"}), 422, "InvalidInput")
    assert_problem(act(client, tokens, "start", {"on_san": True}, vm="nobody"), 404, "VmNotFound")
    assert_problem(client.post("/vms/web1/actions/start", json={"on_san": True}, headers=bearer(tokens["viewer"])),
                   403, "Forbidden")
    assert jobs(rt) == 0
    with rt.sessions() as session:
        assert session.get(VirtualMachine, 1).state == "shut off"


def test_a_san_without_a_host_runs_no_vms():
    with pytest.raises(NoSanHost):
        host_uri(SanConfig(name="san-x", backend="reflink", pool_path=Path("/pool"), pool_size=1 << 30, portal="10.0.0.1"))
