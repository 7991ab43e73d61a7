"""The `laxcluster` command against the API served for real (waitress), with real Celery workers."""

import json

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import select, update

from cli.main import cli
from lab.processes import free_port
from models import ApiToken, ClusterServer
from models.db import transaction
from tasks.queues import CONTROL, node_queue

# The CLI only speaks HTTP; the API tests cover both databases, one is enough here.
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def as_admin(api_url, tokens, *args):
    return run("--url", api_url, "--token", tokens["admin"], *args)


def test_token_create_prints_a_working_token_last(rt, lax_env, api_url):
    result = run("token", "create", "--role", "operator", "--name", "ci-bot", env=lax_env)
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip().splitlines()[-1]
    with rt.sessions() as session:
        stored = session.scalar(select(ApiToken).where(ApiToken.name == "ci-bot"))
    assert stored.role == "operator" and stored.token_hash == ApiToken.digest(secret) and secret not in stored.token_hash
    listed = run("--url", api_url, "servers", "list", "--json", env={"LAXCLUSTER_TOKEN": secret})
    assert listed.exit_code == 0, listed.output
    assert "cs1" in [server["name"] for server in json.loads(listed.stdout)]


def test_token_create_migrates_a_fresh_db(lax_env, tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh' / 'inventory.db'}"
    result = run("token", "create", "--role", "admin", env={**lax_env, "LAXCLUSTER_DB_URL": url})
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith("lax_")
    assert run("token", "create", "--role", "root", env=lax_env).exit_code == 2


def test_servers_list_shows_a_table(rt, api_url, tokens):
    with transaction(rt.sessions) as session:
        session.execute(update(ClusterServer).where(ClusterServer.name == "cs2").values(cpu_count=6, memory_total_bytes=3 << 30))
    result = as_admin(api_url, tokens, "servers", "list")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if " cs2 " in line)
    assert "cluster-a" in row and " 6 " in row and "3.0 GiB" in row and " qemu " in row


def test_api_errors_are_code_and_detail_with_exit_1(api_url, tokens):
    anonymous = run("--url", api_url, "jobs", "list")
    assert anonymous.exit_code == 1 and anonymous.stderr.startswith("Unauthorized: ")
    missing = as_admin(api_url, tokens, "jobs", "show", "no-such-job")
    assert missing.exit_code == 1 and missing.stderr.startswith("JobNotFound: ")
    nowhere = run("--url", f"http://127.0.0.1:{free_port()}", "--token", tokens["admin"], "jobs", "list")
    assert nowhere.exit_code == 1 and nowhere.stderr.startswith("Unreachable: ")


def test_jobs_watch_follows_a_job_to_success(api_url, tokens, celery_worker):
    celery_worker([CONTROL])
    job = json.loads(_post_noop(api_url, tokens, seconds=1, steps=3))
    watched = as_admin(api_url, tokens, "jobs", "watch", job["id"])
    assert watched.exit_code == 0, watched.output
    assert f"job {job['id']}: succeeded" in watched.stdout and "100%" in watched.stdout
    listed = as_admin(api_url, tokens, "jobs", "list", "--state", "succeeded", "--json")
    assert [j["id"] for j in json.loads(listed.stdout)] == [job["id"]]
    shown = as_admin(api_url, tokens, "jobs", "show", job["id"])
    assert "state:" in shown.stdout and "succeeded" in shown.stdout


def test_a_cancelled_job_makes_watch_exit_3(api_url, tokens):
    job = json.loads(_post_noop(api_url, tokens, seconds=30))
    cancelled = as_admin(api_url, tokens, "jobs", "cancel", job["id"])
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    watched = as_admin(api_url, tokens, "jobs", "watch", job["id"])
    assert watched.exit_code == 3 and watched.stderr.startswith("Cancelled: ")


def test_servers_refresh_watch_exits_1_with_the_error_when_the_job_fails(rt, api_url, tokens, celery_worker):
    # libvirt's own test driver answers but cannot report memory stats, so every child fails for real.
    with transaction(rt.sessions) as session:
        session.execute(update(ClusterServer).values(libvirt_uri="test:///default"))
        servers = list(session.scalars(select(ClusterServer.name)))
    celery_worker([CONTROL, *map(node_queue, servers)], concurrency=2)
    result = as_admin(api_url, tokens, "servers", "refresh", "--watch")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("RefreshFailed: could not refresh: cs1")
    with rt.sessions() as session:
        assert session.scalar(select(ClusterServer.reachable).where(ClusterServer.name == "cs1")) is False


def _post_noop(api_url, tokens, **body) -> str:
    response = requests.post(f"{api_url}/jobs/noop", json=body, headers={"Authorization": f"Bearer {tokens['admin']}"}, timeout=10)
    assert response.status_code == 202, response.text
    return response.text
