"""`GET /audit`: the audit trail for admins, newest first, filtered and paged; and in the OpenAPI document."""

from datetime import datetime, timedelta

import pytest

from models import AuditEvent, utcnow
from models.db import transaction
from tests.fixtures.http import assert_problem, bearer


def record(rt, *events: tuple[str, str, str, timedelta]) -> None:
    """Audit events (actor, action, target, age) as the API would have written them."""
    with transaction(rt.sessions) as session:
        session.add_all(AuditEvent(actor=actor, action=action, target=target, at=utcnow() - age, source_ip="192.0.2.9",
                                   details={"why": f"{action} {target}"})
                        for actor, action, target, age in events)


def audit(client, admin: str, **query) -> dict:
    response = client.get("/audit", query_string=query, headers=bearer(admin))
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def keys(page: dict) -> list[tuple[str, str, str]]:
    return [(e["actor"], e["action"], e["target"]) for e in page["items"]]


def test_the_trail_shows_real_changes_newest_first(client, tokens):
    job = client.post("/jobs/noop", json={"target": "audit-me"}, headers=bearer(tokens["admin"])).get_json()
    client.post(f"/jobs/{job['id']}/cancel", headers=bearer(tokens["operator"]))
    page = audit(client, tokens["admin"])
    assert keys(page) == [("test-operator", "job.cancel", "noop/audit-me"), ("test-admin", "job.noop", "noop/audit-me")]
    newest = page["items"][0]
    assert newest["source_ip"] == "127.0.0.1" and newest["details"] == {"job_id": job["id"]} and newest["at"].endswith("Z")
    assert page["next_before"] is None


def test_filters_by_actor_action_target_and_since(rt, client, tokens):
    record(rt, ("alice", "vm.delete", "vm/web1", timedelta(days=3)),
           ("bob", "job.start", "vm/web1", timedelta(hours=2)),
           ("alice", "job.start", "vm/db1", timedelta(minutes=10)))
    admin = tokens["admin"]
    assert keys(audit(client, admin, actor="alice")) == [("alice", "job.start", "vm/db1"), ("alice", "vm.delete", "vm/web1")]
    assert keys(audit(client, admin, action="job.start", target="vm/web1")) == [("bob", "job.start", "vm/web1")]
    assert keys(audit(client, admin, since="1h")) == [("alice", "job.start", "vm/db1")]
    a_day_ago = (utcnow() - timedelta(days=1)).isoformat(timespec="seconds")
    assert len(audit(client, admin, since=a_day_ago + "Z")["items"]) == 2
    # The same moment written in another zone is the same filter.
    assert len(audit(client, admin, since=_in_zone_plus_two(a_day_ago))["items"]) == 2
    assert audit(client, admin, actor="nobody")["items"] == []


def test_pages_of_limit_events_cover_the_trail_once(rt, client, tokens):
    record(rt, *[(f"actor-{n}", "job.noop", f"noop/page-{n}", timedelta(seconds=100 - n)) for n in range(7)])
    seen, before = [], None
    while True:
        page = audit(client, tokens["admin"], limit=3, **({"before": before} if before else {}))
        assert len(page["items"]) <= 3
        seen += [e["actor"] for e in page["items"]]
        before = page["next_before"]
        if before is None:
            break
    assert seen == [f"actor-{n}" for n in reversed(range(7))]


@pytest.mark.parametrize("query, field", [
    ({"limit": "0"}, "limit"), ({"limit": "501"}, "limit"), ({"since": "yesterday"}, "since"), ({"before": "x"}, "before"),
])
def test_query_parameters_are_checked(client, tokens, query, field):
    response = client.get("/audit", query_string=query, headers=bearer(tokens["admin"]))
    assert assert_problem(response, 422, "InvalidInput")["field"] == field


def test_the_trail_is_an_admins(client, tokens):
    for role in ("viewer", "operator"):
        assert assert_problem(client.get("/audit", headers=bearer(tokens[role])), 403, "Forbidden")["required_role"] == "admin"


def test_openapi_describes_audit_and_tokens_for_admins(client, tokens):
    paths = client.get("/openapi.json", headers=bearer(tokens["viewer"])).get_json()["paths"]
    described = [paths["/audit"]["get"], paths["/tokens"]["get"], paths["/tokens"]["post"], paths["/tokens/{token_id}"]["delete"]]
    assert [operation["x-required-role"] for operation in described] == ["admin"] * 4
    assert {p["name"] for p in paths["/audit"]["get"]["parameters"]} == {"actor", "action", "target", "since", "before", "limit"}
    assert "secret" in paths["/tokens"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]["properties"]


def _in_zone_plus_two(naive_utc: str) -> str:
    return (datetime.fromisoformat(naive_utc) + timedelta(hours=2)).isoformat() + "+02:00"
