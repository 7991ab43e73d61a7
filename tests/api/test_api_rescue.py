"""`POST /vms/<name>/actions/rescue` over HTTP: a job for a stopped VM, a stable 409 for every state that does
not allow it, and a VM in rescue neither starts nor moves."""

import pytest

from models import Job, VirtualMachine
from models.db import transaction
from tests.fixtures import factories
from tests.fixtures.http import assert_problem, bearer


def vm_in(rt, state: str) -> str:
    with transaction(rt.sessions) as session:
        factories.vm(session, "web1", template_row=factories.template(session), server="cs1", state=state,
                     disk_bytes=1 << 30)
    return "web1"


def act(client, tokens, action: str, body=None, vm="web1"):
    return client.post(f"/vms/{vm}/actions/{action}", json=body or {}, headers=bearer(tokens["operator"]))


def test_a_stopped_vm_is_rescued_by_a_rescue_job_on_its_lock(rt, client, tokens):
    vm_in(rt, "shut off")
    response = act(client, tokens, "rescue")
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert (job["kind"], job["target"], job["params"]) == ("rescue", "vm/web1", {"vm": "web1"})


def test_ending_a_rescue_is_the_same_job_with_end(rt, client, tokens):
    vm_in(rt, "rescue")
    job = act(client, tokens, "rescue", {"end": True}).get_json()
    assert (job["kind"], job["params"]) == ("rescue", {"vm": "web1", "end": True})


@pytest.mark.parametrize("state, body, code", [
    ("running", {}, "VmIsRunning"),
    ("paused", {}, "VmIsRunning"),
    ("installing", {}, "VmIsRunning"),
    ("rescue", {}, "VmInRescue"),
    ("shut off", {"end": True}, "VmNotInRescue"),
])
def test_a_state_that_does_not_allow_it_is_409_and_makes_no_job(rt, client, tokens, state, body, code):
    vm_in(rt, state)
    assert_problem(act(client, tokens, "rescue", body), 409, code)
    with rt.sessions() as session:
        assert session.query(Job).count() == 0


@pytest.mark.parametrize("action", ["start", "migrate"])
def test_a_vm_in_rescue_neither_starts_nor_moves(rt, client, tokens, action):
    vm_in(rt, "rescue")
    assert_problem(act(client, tokens, action), 409, "VmInRescue")


def test_bad_rescue_requests_are_refused_before_any_job(rt, client, tokens):
    vm_in(rt, "shut off")
    assert_problem(act(client, tokens, "rescue", {"end": "yes"}), 422, "InvalidInput")
    assert_problem(act(client, tokens, "rescue", {"kernel": "/boot/x"}), 422, "InvalidInput")
    assert_problem(act(client, tokens, "rescue", vm="nobody"), 404, "VmNotFound")
    assert_problem(client.post("/vms/web1/actions/rescue", json={}, headers=bearer(tokens["viewer"])), 403, "Forbidden")
    with rt.sessions() as session:
        assert session.get(VirtualMachine, 1).state == "shut off"
