"""The web console through Flask's test client: sign-in keeps the token in an HttpOnly, SameSite=Strict
session cookie; every page needs a session; every post needs the session's CSRF token and the operator role
(a viewer's page shows no action buttons, and its posts are refused); forms start the same jobs as the API,
after the same validation, and a refusal is shown as the problem's message."""

import re
from datetime import timedelta

import pytest
from sqlalchemy import select

from models import ApiToken, Job, San, VirtualMachine, utcnow
from models.db import transaction
from models.protection import ReplicaPoint, Replication
from tasks.inventory.tokens import revoke
from tests.fixtures import factories

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def signed_in(client, token: str) -> str:
    """Sign `client` in with `token`; return the session's CSRF token."""
    csrf = CSRF.search(client.get("/ui/signin").get_data(as_text=True))[1]
    response = client.post("/ui/signin", data={"token": token, "csrf": csrf})
    assert response.status_code == 303, response.get_data(as_text=True)
    return CSRF.search(client.get("/ui/").get_data(as_text=True))[1]


@pytest.fixture
def web1(rt) -> str:
    with transaction(rt.sessions) as session:
        factories.vm(session, "web1", template_row=factories.template(session), server="cs1", state="shut off",
                     disk_bytes=1 << 30, description="the web server")
    return "web1"


def jobs(rt) -> list[Job]:
    with rt.sessions() as session:
        return list(session.scalars(select(Job)))


def test_pages_need_a_session_and_sign_in_keeps_the_token_in_a_strict_httponly_cookie(client, tokens, web1):
    assert client.get("/ui/").headers["Location"] == "/ui/signin?next=/ui/"
    csrf = CSRF.search(client.get("/ui/signin").get_data(as_text=True))[1]
    response = client.post("/ui/signin", data={"token": tokens["viewer"], "csrf": csrf, "next": "/ui/vms/web1"})
    assert (response.status_code, response.headers["Location"]) == (303, "/ui/vms/web1")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and tokens["viewer"] not in cookie
    page = client.get("/ui/").get_data(as_text=True)
    for shown in ("site-a", "cs1", "san-a", "Machine", "Cserver", "IP address", "web1", "the web server"):
        assert shown in page


def test_a_bad_token_or_a_forged_sign_in_is_refused(client, tokens):
    csrf = CSRF.search(client.get("/ui/signin").get_data(as_text=True))[1]
    refused = client.post("/ui/signin", data={"token": "not-a-token", "csrf": csrf})
    assert refused.status_code == 401 and "Unauthorized" in refused.get_data(as_text=True)
    assert client.post("/ui/signin", data={"token": tokens["admin"]}).status_code == 403
    assert client.get("/ui/").status_code == 302


def test_a_revoked_token_ends_the_session_at_once(rt, client, tokens, web1):
    signed_in(client, tokens["operator"])
    with transaction(rt.sessions) as session:
        revoke(session, session.scalar(select(ApiToken.id).where(ApiToken.name == "test-operator")))
    assert client.get("/ui/vms/web1").headers["Location"].startswith("/ui/signin")


def test_a_viewer_sees_no_action_buttons_and_its_posts_are_refused(rt, client, tokens, web1):
    csrf = signed_in(client, tokens["viewer"])
    page = client.get("/ui/vms/web1").get_data(as_text=True)
    assert "web1" in page and "/actions/" not in page and "/delete" not in page and "Install a machine" not in client.get("/ui/").get_data(as_text=True)
    refused = client.post("/ui/vms/web1/actions/start", data={"csrf": csrf})
    assert refused.status_code == 403 and "Forbidden" in refused.get_data(as_text=True)
    assert jobs(rt) == []


def test_a_forged_post_is_refused(rt, client, tokens, web1):
    csrf = signed_in(client, tokens["operator"])
    assert client.post("/ui/vms/web1/actions/start").status_code == 403
    assert client.post("/ui/vms/web1/actions/start", data={"csrf": csrf[::-1]}).status_code == 403
    assert client.post("/ui/vms/web1/delete", data={"confirm": "web1"}).status_code == 403
    assert jobs(rt) == []


def test_actions_start_the_apis_jobs_and_show_them(rt, client, tokens, web1):
    csrf = signed_in(client, tokens["operator"])
    started = client.post("/ui/vms/web1/actions/start", data={"csrf": csrf})
    assert started.status_code == 303
    job_id = started.headers["Location"].rsplit("/", 1)[1]
    page = client.get(started.headers["Location"]).get_data(as_text=True)
    assert "start" in page and 'id="job-progress"' in page and "Cancel" in page
    assert f'action="/ui/jobs/{job_id}/cancel"' in client.get("/ui/jobs").get_data(as_text=True)
    [job] = jobs(rt)
    assert (job.id, job.kind, job.params, job.requested_by) == (job_id, "start", {"vm": "web1"}, "test-operator")
    assert client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": csrf}).status_code == 303
    # The page follows the job by the API's event stream, here to its end.
    events = client.get(f"/ui/jobs/{job_id}/events")
    assert events.mimetype == "text/event-stream" and '"state": "cancelled"' in events.get_data(as_text=True)
    checked = client.post("/ui/vms/web1/actions/migrate", data={"csrf": csrf, "to": "cs2", "check": "1"})
    assert checked.status_code == 303
    assert [(j.kind, j.params) for j in jobs(rt) if j.kind == "migrate"] == [
        ("migrate", {"vm": "web1", "to": "cs2", "live": True, "check": True})]


def test_delete_needs_the_name_typed(rt, client, tokens, web1):
    csrf = signed_in(client, tokens["operator"])
    refused = client.post("/ui/vms/web1/delete", data={"csrf": csrf, "confirm": "web"})
    assert refused.status_code == 422 and "type the VM" in refused.get_data(as_text=True)
    assert jobs(rt) == []
    assert client.post("/ui/vms/web1/delete", data={"csrf": csrf, "confirm": "web1"}).status_code == 303
    assert [job.kind for job in jobs(rt)] == ["delete-vm"]


def test_the_install_form_reserves_the_vm_and_starts_its_install(rt, client, tokens):
    with transaction(rt.sessions) as session:
        factories.template(session)
    csrf = signed_in(client, tokens["operator"])
    form = {"csrf": csrf, "name": "db1", "template": "tiny", "memory": "256M", "vcpus": "2", "disk": "1G", "ssh_keys": "",
            "ha": "on", "server": "cs2"}
    refused = client.post("/ui/install", data={**form, "memory": "lots"})
    assert refused.status_code == 422 and "memory" in refused.get_data(as_text=True)
    installed = client.post("/ui/install", data=form)
    assert installed.status_code == 303, installed.get_data(as_text=True)
    with rt.sessions() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == "db1"))
        assert (vm.state, vm.vcpus, vm.memory_bytes, vm.ha) == ("installing", 2, 256 << 20, True)
    assert [(job.kind, job.params["server"]) for job in jobs(rt)] == [("install-vm", "cs2")]


def test_the_live_fragments_and_the_api_document(client, tokens, web1):
    signed_in(client, tokens["viewer"])
    fragment = client.get("/ui/fragments/vms", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "<table" in fragment and "web1" in fragment and "<html" not in fragment
    tree = client.get("/ui/fragments/tree", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "cs1" in tree and "san-a" in tree and "free memory" in tree and "<html" not in tree
    assert client.get("/ui/vendor/htmx.min.js").status_code == 200
    assert not [path for path in client.get("/openapi.json", headers={"Authorization": f"Bearer {tokens['viewer']}"})
                .get_json()["paths"] if path.startswith("/ui")]


@pytest.mark.parametrize("problems", [[], [{"code": "NoCapacity", "message": "cs2 has 100 MB free"}]])
def test_a_migration_check_offers_the_move_only_when_nothing_stands_in_the_way(rt, client, tokens, web1, problems):
    csrf = signed_in(client, tokens["operator"])
    checked = client.post("/ui/vms/web1/actions/migrate", data={"csrf": csrf, "to": "cs2", "check": "1"})
    with transaction(rt.sessions) as session:
        job = session.get(Job, checked.headers["Location"].rsplit("/", 1)[1])
        job.state, job.progress = "succeeded", 100.0
        job.result = {"vm": "web1", "source": "cs1", "destination": "cs2", "problems": problems,
                      "can_migrate": not problems}
    page = client.get(checked.headers["Location"]).get_data(as_text=True)
    assert ("Migrate web1 to cs2 now" in page) == (not problems)
    assert ("<li><strong>NoCapacity</strong>: cs2 has 100 MB free</li>" in page) == bool(problems)


def test_the_install_form_is_checked_live_and_nothing_is_kept(rt, client, tokens, web1):
    csrf = signed_in(client, tokens["operator"])
    form = {"name": "db1", "template": "tiny", "memory": "256M", "vcpus": "1", "disk": "1G"}
    headers = {"HX-Request": "true", "X-CSRF-Token": csrf}
    ready = client.post("/ui/install/check", data=form, headers=headers)
    assert ready.status_code == 200 and "Ready: db1 from tiny" in ready.get_data(as_text=True)
    taken = client.post("/ui/install/check", data={**form, "name": "web1"}, headers=headers).get_data(as_text=True)
    assert "VmExists" in taken and "<html" not in taken
    assert "InvalidInput" in client.post("/ui/install/check", data={**form, "vcpus": "x"}, headers=headers).get_data(as_text=True)
    assert "TemplateNotFound" in client.post("/ui/install/check", data={**form, "template": "nope"},
                                             headers=headers).get_data(as_text=True)
    with rt.sessions() as session:
        assert session.scalars(select(VirtualMachine.name)).all() == ["web1"]
    assert jobs(rt) == []


def test_the_vm_page_shows_its_replication_and_the_age_of_its_newest_replica(rt, client, tokens, web1):
    signed_in(client, tokens["viewer"])
    assert "not replicated" in client.get("/ui/vms/web1").get_data(as_text=True)
    with transaction(rt.sessions) as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == "web1"))
        peer = session.scalar(select(San.id).where(San.name == "san-b"))
        rep = Replication(vm_id=vm.id, peer_san_id=peer, mode="continuous", rpo_target_s=30)
        session.add(rep)
        session.flush()
        session.add(ReplicaPoint(replication_id=rep.id, name="rep-7", san_id=peer, taken_at=utcnow() - timedelta(seconds=100)))
    page = client.get("/ui/vms/web1").get_data(as_text=True)
    assert "state-alert" in page and "rep-7" in page and "san-b" in page and "target 30 s" in page
