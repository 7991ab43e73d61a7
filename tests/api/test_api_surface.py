"""The API's outer surface: who may call what, how errors look, what the OpenAPI document says."""

from datetime import timedelta

import pytest
import redis
from openapi_spec_validator import OpenAPIV31SpecValidator
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import select, update

from api import create_app, validation
from api.openapi import ANYONE, document, openapi_path, operation
from errors import InvalidInput
from models import ApiToken
from models.db import transaction
from tasks.runtime import Runtime
from lab.processes import free_port
from tests.fixtures.http import assert_problem, bearer

DUMMY_ARGUMENTS = {"job_id": "0b7c5b0e-0000-4000-8000-000000000000", "name": "cs1", "volume_id": "1", "action": "start",
                   "backup_id": "0b7c5b0e-0000-4000-8000-000000000001", "token_id": "999999"}


def api_rules(app):
    """Every route of the JSON API; the web console's (`ui.`, tests/ui) sign in with a session cookie instead."""
    return [rule for rule in app.url_map.iter_rules() if not rule.endpoint.startswith("ui.")]


def every_route(app):
    """(method, url) for every rule and method of the app, path arguments filled with harmless values."""
    for rule in api_rules(app):
        url = rule.rule
        for argument in rule.arguments:
            url = url.replace(f"<{argument}>", DUMMY_ARGUMENTS[argument])
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, url


def test_every_route_but_health_needs_a_token(app, client, tokens):
    routes = list(every_route(app))
    assert len(routes) >= 12
    for method, url in routes:
        anonymous = client.open(url, method=method)
        forged = client.open(url, method=method, headers=bearer("lax_not-a-real-token"))
        if (method, url) == ("GET", "/health"):
            assert anonymous.status_code == 200
            continue
        assert_problem(anonymous, 401, "Unauthorized")
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        assert_problem(forged, 401, "Unauthorized")


def test_a_revoked_token_is_refused(rt, client, tokens):
    with transaction(rt.sessions) as session:
        session.execute(update(ApiToken).where(ApiToken.name == "test-admin").values(revoked=True))
    assert_problem(client.get("/jobs", headers=bearer(tokens["admin"])), 401, "TokenRevoked")
    assert client.get("/jobs", headers=bearer(tokens["viewer"])).status_code == 200


def test_roles_are_ordered_viewer_operator_admin(app, client, tokens):
    posts = [url for method, url in every_route(app) if method == "POST"]
    assert "/servers/refresh" in posts and "/jobs/noop" in posts
    for url in posts:
        body = assert_problem(client.post(url, headers=bearer(tokens["viewer"])), 403, "Forbidden")
        assert body["required_role"] in ("operator", "admin")
    assert_problem(client.post("/jobs/noop", json={}, headers=bearer(tokens["operator"])), 403, "Forbidden")
    assert client.post("/jobs/noop", json={}, headers=bearer(tokens["admin"])).status_code == 202
    for _, url in (route for route in every_route(app) if route[0] == "GET" and "<" not in route[1]):
        if "/events" not in url:
            # The console is an operator's tool: a viewer may list and read, not type into a VM;
            # tokens and the audit trail are an admin's.
            expected = (403,) if url.endswith("/console") or url in ("/tokens", "/audit") else (200, 404)
            assert client.get(url, headers=bearer(tokens["viewer"])).status_code in expected, url


def test_last_used_is_written_at_most_once_a_minute(rt, client, tokens):
    def last_used():
        with rt.sessions() as session:
            return session.scalar(select(ApiToken.last_used_at).where(ApiToken.name == "test-viewer"))

    assert last_used() is None
    client.get("/jobs", headers=bearer(tokens["viewer"]))
    first = last_used()
    client.get("/jobs", headers=bearer(tokens["viewer"]))
    assert first is not None and last_used() == first
    with transaction(rt.sessions) as session:
        session.execute(update(ApiToken).where(ApiToken.name == "test-viewer").values(last_used_at=first - timedelta(minutes=2)))
    client.get("/jobs", headers=bearer(tokens["viewer"]))
    assert last_used() > first - timedelta(minutes=2)


def test_errors_are_problem_json_with_stable_codes(client, tokens):
    auth = bearer(tokens["admin"])
    assert_problem(client.get("/no/such/thing", headers=auth), 404, "NotFound")
    not_allowed = assert_problem(client.delete("/jobs", headers=auth), 405, "MethodNotAllowed")
    assert not_allowed["detail"]
    assert_problem(client.get(f"/jobs/{DUMMY_ARGUMENTS['job_id']}", headers=auth), 404, "JobNotFound")
    assert_problem(client.get("/servers/nope", headers=auth), 404, "ServerNotFound")
    assert_problem(client.get("/servers/Bad_Name", headers=auth), 422, "InvalidInput")


@pytest.mark.parametrize("body, field", [
    ({"seconds": -1}, "seconds"),
    ({"seconds": "ten"}, "seconds"),
    ({"steps": 0}, "steps"),
    ({"steps": True}, "steps"),
    ({"target": "Not OK"}, "target"),
    ({"colour": "red"}, "colour"),
    ([1, 2], "body"),
])
def test_input_is_validated_at_the_edge(client, tokens, body, field):
    response = client.post("/jobs/noop", json=body, headers=bearer(tokens["admin"]))
    assert assert_problem(response, 422, "InvalidInput")["field"] == field


def test_query_parameters_are_validated(client, tokens):
    auth = bearer(tokens["viewer"])
    assert assert_problem(client.get("/jobs?limit=0", headers=auth), 422, "InvalidInput")["field"] == "limit"
    assert assert_problem(client.get("/jobs?state=sleeping", headers=auth), 422, "InvalidInput")["field"] == "state"
    key = "not a key!"
    response = client.post("/jobs/noop", json={}, headers={**bearer(tokens["admin"]), "Idempotency-Key": key})
    assert assert_problem(response, 422, "InvalidInput")["field"] == "Idempotency-Key"


def test_sizes_take_units_and_bounds():
    assert validation.size("512M", "memory", 1, 1 << 40) == 512 << 20
    assert validation.size(4096, "memory", 1, 1 << 40) == 4096
    for bad in ("20X", "-1G", True, None, "2T"):
        with pytest.raises(InvalidInput) as error:
            validation.size(bad, "memory", 1 << 20, 1 << 40)
        assert error.value.extra["field"] == "memory"


def test_a_crash_is_a_500_problem_without_internals(rt, celery_app):
    app = create_app(rt, celery_app)

    @operation("fails on purpose", role=ANYONE)
    def crash():
        raise RuntimeError("secret internals")

    app.add_url_rule("/crash", view_func=crash)
    body = assert_problem(app.test_client().get("/crash"), 500, "InternalError")
    assert "secret" not in body["detail"]


def test_health_reports_db_and_redis(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "checks": {"db": "ok", "redis": "ok"}}


def test_an_unreachable_redis_is_503_not_a_crash(rt, celery_app, client, tokens):
    job = client.post("/jobs/noop", json={}, headers=bearer(tokens["admin"])).get_json()
    # No retries: what is tested is the answer, not redis-py's back-off while it waits.
    dead_redis = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    cut_off = Runtime(rt.config, rt.engine, rt.sessions, dead_redis)
    without_redis = create_app(cut_off, celery_app).test_client()
    health = without_redis.get("/health")
    assert health.status_code == 503
    assert health.get_json()["checks"]["db"] == "ok" and health.get_json()["checks"]["redis"].startswith("error")
    events = without_redis.get(f"/jobs/{job['id']}/events", headers=bearer(tokens["viewer"]))
    assert_problem(events, 503, "ServiceUnavailable")
    refused = without_redis.post("/jobs/noop", json={}, headers=bearer(tokens["admin"]))
    assert_problem(refused, 503, "BrokerUnavailable")


def test_openapi_describes_every_route(app, client, tokens):
    spec = client.get("/openapi.json", headers=bearer(tokens["viewer"])).get_json()
    assert spec["openapi"].startswith("3.1")
    for rule in api_rules(app):
        path = spec["paths"][openapi_path(rule)]
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            described = path[method.lower()]
            assert described["summary"] != rule.endpoint, f"{rule} has no operation() description"
            assert described["responses"]
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert spec["paths"]["/jobs/noop"]["post"]["x-required-role"] == "admin"
    assert spec["paths"]["/servers/refresh"]["post"]["x-required-role"] == "operator"
    assert {p["name"] for p in spec["paths"]["/jobs/{job_id}"]["get"]["parameters"]} == {"job_id"}
    assert spec == document(app)


def test_the_openapi_document_is_valid_openapi_31(client, tokens):
    spec = client.get("/openapi.json", headers=bearer(tokens["viewer"])).get_json()
    OpenAPIV31SpecValidator(spec).validate()
