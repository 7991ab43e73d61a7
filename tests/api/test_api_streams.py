"""Long-lived streams are capped: beyond `[api] max_streams` an event stream or console is refused 503
TooManyStreams at once, `/health` keeps answering, and a stream that closes frees its slot.
Against the API served by gunicorn's threaded worker (4 threads), as `laxcluster run` serves it."""

import secrets

import pytest
import redis
import requests
from redis.backoff import NoBackoff
from redis.retry import Retry

from api import create_app
from lab.processes import free_port, wait_until
from tasks.runtime import Runtime
from tests.fixtures.console import refused
from tests.fixtures.http import assert_problem, bearer

MAX_STREAMS = 2

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def lax_env(lax_env: dict[str, str]) -> dict[str, str]:
    # A short keep-alive, so the server notices a client that left within a second or two.
    return {**lax_env, "LAXCLUSTER_API_MAX_STREAMS": str(MAX_STREAMS), "LAXCLUSTER_API_SSE_KEEPALIVE_S": "0.5"}


def open_stream(url: str, token: str) -> requests.Response:
    """A job's event stream, open and past its first frame (so the server is serving it)."""
    response = requests.get(url, headers=bearer(token), stream=True, timeout=(5, 10))
    assert response.status_code == 200, response.text
    assert next(response.iter_lines(chunk_size=None)) == b"retry: 3000"
    return response


def stream_if_free(url: str, token: str) -> requests.Response | None:
    response = requests.get(url, headers=bearer(token), stream=True, timeout=(5, 10))
    if response.status_code == 503 and response.json()["code"] == "TooManyStreams":
        response.close()
        return None
    assert response.status_code == 200, response.text
    return response


def test_streams_beyond_the_cap_are_refused_and_health_still_answers(served_api, tokens):
    # A job no worker takes stays queued, so its event streams stay open until their clients leave.
    job = requests.post(f"{served_api.url}/jobs/noop", json={"target": f"streams-{secrets.token_hex(4)}"},
                        headers=bearer(tokens["admin"]), timeout=10).json()
    events = f"{served_api.url}/jobs/{job['id']}/events"
    streams = [open_stream(events, tokens["viewer"]) for _ in range(MAX_STREAMS)]
    try:
        with requests.get(events, headers=bearer(tokens["viewer"]), stream=True, timeout=10) as full:
            assert (full.status_code, full.headers["Content-Type"]) == (503, "application/problem+json")
            assert (full.json()["code"], full.json()["max_streams"]) == ("TooManyStreams", MAX_STREAMS)
            assert full.headers["Retry-After"] == "5"
        # Consoles take the same slots: refused before anything else is looked at.
        status, problem = refused(served_api.console_url("any-vm"), tokens["operator"])
        assert (status, problem["code"]) == (503, "TooManyStreams")
        assert requests.get(f"{served_api.url}/health", timeout=2).status_code == 200

        streams.pop().close()
        streams.append(wait_until(lambda: stream_if_free(events, tokens["viewer"]), 20,
                                  "the closed stream's slot to be free again", interval=0.2))
        assert next(streams[-1].iter_lines(chunk_size=None)) == b"retry: 3000"
    finally:
        for stream in streams:
            stream.close()
    assert "Traceback" not in served_api.log.read_text()


def test_a_stream_that_fails_to_start_gives_its_slot_back(rt, celery_app, client, tokens):
    job = client.post("/jobs/noop", json={}, headers=bearer(tokens["admin"])).get_json()
    dead_redis = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    without_redis = create_app(Runtime(rt.config, rt.engine, rt.sessions, dead_redis), celery_app).test_client()
    for _ in range(MAX_STREAMS + 1):
        response = without_redis.get(f"/jobs/{job['id']}/events", headers=bearer(tokens["viewer"]))
        assert_problem(response, 503, "ServiceUnavailable")
