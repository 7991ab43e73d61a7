"""POST /check and GET /check with real Redis, DB and Celery, but no lab: nobody serves the SAN and server
queues, so every SAN and server is reported unreachable after the timeout instead of hanging the check."""

from sqlalchemy import select

from lab.processes import wait_until
from models import SUCCEEDED, Job
from tasks.queues import CONTROL
from tests.fixtures.vms import wait_job


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_check_without_workers_reports_every_san_and_server_unreachable(rt, client, tokens, celery_worker):
    none_yet = client.get("/check", headers=bearer(tokens["viewer"]))
    assert (none_yet.status_code, none_yet.get_json()["code"]) == (404, "CheckNotFound")
    refused = client.post("/check", json={"repair": "yes"}, headers=bearer(tokens["operator"]))
    assert (refused.status_code, refused.get_json()["field"]) == (422, "repair")
    assert client.post("/check", json={}, headers=bearer(tokens["viewer"])).status_code == 403

    celery_worker([CONTROL], concurrency=2, beat=True)  # beat's reconciler ends the wait at its deadline
    started = client.post("/check", json={"timeout_s": 3}, headers=bearer(tokens["operator"]))
    assert started.status_code == 202
    job = started.get_json()
    assert (started.headers["Location"], job["kind"], job["target"]) == (f"/jobs/{job['id']}", "check-cluster", "cluster-check")
    busy = client.post("/check", json={}, headers=bearer(tokens["operator"]))
    assert (busy.status_code, busy.get_json()["code"]) == (409, "TargetBusy")

    assert wait_job(rt, job["id"], timeout=120).state == SUCCEEDED
    report = client.get("/check", headers=bearer(tokens["viewer"])).get_json()
    assert report["job"]["id"] == job["id"] and report["clean"] is False and report["repaired"] == []
    assert {(d["kind"], d["resource"], d["where"], d["safe"]) for d in report["drifts"]} == {
        ("unreachable", "san", "san-a", False), ("unreachable", "san", "san-b", False),
        ("unreachable", "server", "cs1", False), ("unreachable", "server", "cs2", False),
        ("unreachable", "server", "cs3", False)}
    assert all("no answer within 3 s" in d["detail"] for d in report["drifts"])
    # The unanswered inspections were cancelled, so no lock stays behind on a queue nobody serves.
    children = wait_until(lambda: _all_final(rt, job["id"]), 10, "the inspections to be cancelled")
    assert sorted((child.kind, child.state) for child in children) == [("inspect-node", "cancelled")] * 3 + [
        ("inspect-san", "cancelled")] * 2


def _all_final(rt, parent_id: str) -> list[Job] | None:
    with rt.sessions() as session:
        children = session.scalars(select(Job).where(Job.parent_id == parent_id)).all()
    return children if all(child.is_final for child in children) else None


def test_openapi_documents_the_check_routes(client, tokens):
    paths = client.get("/openapi.json", headers=bearer(tokens["viewer"])).get_json()["paths"]
    assert paths["/check"]["post"]["x-required-role"] == "operator"
    assert paths["/check"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CheckReport"}
    assert "repair" in paths["/check"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
