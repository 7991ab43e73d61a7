"""`GET /metrics`: Prometheus's text format with live values from the inventory DB and Redis."""

import secrets
from datetime import timedelta

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from models import ClusterServer, Job, JobLock, San, utcnow
from models.db import transaction
from models.protection import Backup, BackupStore
from tests.fixtures.http import assert_problem, bearer


def scrape(client, token: str) -> dict:
    response = client.get("/metrics", headers=bearer(token))
    assert response.status_code == 200 and response.mimetype == "text/plain"
    return {family.name: family for family in text_string_to_metric_families(response.get_data(as_text=True))}


def value(families: dict, sample: str, **labels) -> float | None:
    """The value of `sample` with exactly `labels`, None if there is none."""
    family = next((f for f in families.values() if any(s.name == sample for s in f.samples)), None)
    found = [s.value for s in (family.samples if family else []) if s.name == sample and s.labels == labels]
    return found[0] if found else None


def add_jobs(rt, kind: str) -> tuple[str, str]:
    """Three ended jobs of `kind` (two succeeded, 2 s and 100 s long, one failed), one running holding a lock,
    one queued for the same target; returns the target and the running job's id."""
    now, target = utcnow(), f"metrics/{secrets.token_hex(3)}"
    with transaction(rt.sessions) as session:
        for state, seconds in (("succeeded", 2), ("succeeded", 100), ("failed", 3)):
            session.add(Job(kind=kind, target=f"{target}-{seconds}", queue="control", state=state,
                            started_at=now - timedelta(seconds=seconds + 5), finished_at=now - timedelta(seconds=5)))
        running = Job(kind=kind, target=target, queue="san.site-a", state="running", started_at=now)
        session.add(running)
        session.flush()
        session.add(JobLock(target=target, job_id=running.id))
        session.add(Job(kind=kind, target=target, queue="san.site-a", created_at=now - timedelta(seconds=30)))
        return target, running.id


def test_jobs_appear_by_kind_state_and_queue_with_their_durations(rt, client, tokens):
    kind = f"kind-{secrets.token_hex(3)}"
    add_jobs(rt, kind)
    families = scrape(client, tokens["viewer"])
    assert value(families, "laxcluster_jobs_total", kind=kind, state="succeeded") == 2
    assert value(families, "laxcluster_jobs_total", kind=kind, state="failed") == 1
    assert value(families, "laxcluster_jobs_active", queue="san.site-a", state="running") == 1
    assert value(families, "laxcluster_jobs_active", queue="san.site-a", state="queued") == 1
    assert value(families, "laxcluster_jobs_waiting_for_lock", kind=kind) == 1
    assert value(families, "laxcluster_job_oldest_queued_seconds", queue="san.site-a") >= 30
    assert value(families, "laxcluster_job_duration_seconds_count", kind=kind) == 3
    assert value(families, "laxcluster_job_duration_seconds_bucket", kind=kind, le="5.0") == 2
    assert value(families, "laxcluster_job_duration_seconds_bucket", kind=kind, le="60.0") == 2
    assert value(families, "laxcluster_job_duration_seconds_bucket", kind=kind, le="300.0") == 3
    assert abs(value(families, "laxcluster_job_duration_seconds_sum", kind=kind) - 105) < 1


def test_servers_sans_and_backups_show_their_state(rt, client, tokens):
    with transaction(rt.sessions) as session:
        server = session.scalars(select(ClusterServer).order_by(ClusterServer.name)).first()
        server.memory_free_bytes, server.memory_total_bytes, server.cpu_count = 3 << 30, 4 << 30, 4
        server.fenced_at, server.maintenance = utcnow(), True
        san = session.scalars(select(San).order_by(San.name)).first()
        san.facts = {**(san.facts or {}), "free_bytes": 7 << 30}
        store = BackupStore(name=f"m-{secrets.token_hex(3)}", kind="local", location="/nowhere", credentials={})
        session.add(store)
        session.flush()
        for vm, state, hours in (("m-web", "complete", 2), ("m-web", "failed", 1), ("m-db", "verified", 3)):
            session.add(Backup(vm_name=vm, store_id=store.id, mode="full", state=state,
                               created_at=utcnow() - timedelta(hours=hours)))
        server_name, san_name = server.name, san.name
    families = scrape(client, tokens["viewer"])
    assert value(families, "laxcluster_server_memory_free_bytes", server=server_name) == 3 << 30
    assert value(families, "laxcluster_server_fenced", server=server_name) == 1
    assert value(families, "laxcluster_server_maintenance", server=server_name) == 1
    assert value(families, "laxcluster_server_vms", server=server_name) == 0
    assert value(families, "laxcluster_server_memory_allocatable_bytes", server=server_name) > 0
    assert value(families, "laxcluster_san_pool_free_bytes", san=san_name) == 7 << 30
    assert value(families, "laxcluster_backup_last_ok", vm="m-web") == 0  # its newest one failed
    assert value(families, "laxcluster_backup_last_ok", vm="m-db") == 1
    assert 2 * 3600 - 60 < value(families, "laxcluster_backup_age_seconds", vm="m-web") < 2 * 3600 + 60


def test_api_requests_are_counted_by_route_method_and_status(client, tokens):
    # A request is counted once its answer is closed, as every WSGI server does after sending it.
    for _ in range(3):
        with client.get("/jobs", headers=bearer(tokens["viewer"])) as listed:
            assert listed.status_code == 200
    with client.get("/jobs/no-such-job", headers=bearer(tokens["viewer"])) as missing:
        assert missing.status_code == 404
    families = scrape(client, tokens["viewer"])
    assert value(families, "laxcluster_api_request_duration_seconds_count", route="/jobs", method="GET", status="200") == 3
    assert value(families, "laxcluster_api_request_duration_seconds_count", route="/jobs/<job_id>", method="GET",
                 status="404") == 1
    assert value(families, "laxcluster_api_request_duration_seconds_bucket", route="/jobs", method="GET", status="200",
                 le="+Inf") == 3


def test_metrics_need_a_token(client):
    assert_problem(client.get("/metrics"), 401, "Unauthorized")
