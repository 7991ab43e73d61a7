"""The compose deployment, as far as it can be checked here (no Docker engine or current compose client runs
on our machines): the file is valid against the compose-spec schema, every long-running service has a
health check, Flower is not published beyond the host, each worker's queue comes from its environment,
and the shipped laxcluster.toml loads and fills an inventory.

tests/docker/compose-spec.json is schema/compose-spec.json of github.com/compose-spec/compose-spec at
commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6 (Apache-2.0)."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from sqlalchemy import func, select

import config
from models import ClusterServer, San, Subnet
from models.db import make_engine, make_session_factory, migrate, transaction
from tasks.app import make_celery
from tasks.inventory.config_sync import sync_from_config

DOCKER = Path(__file__).resolve().parents[2] / "docker"
SCHEMA = json.loads(Path(__file__).with_name("compose-spec.json").read_text())
ONE_SHOT = {"migrate"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def schema_errors(document: dict) -> list[str]:
    return [f"{'/'.join(map(str, error.path))}: {error.message}"
            for error in jsonschema.Draft7Validator(SCHEMA).iter_errors(document)]


def test_the_compose_file_is_valid_against_the_compose_spec(compose):
    assert schema_errors(compose) == []


def test_the_schema_check_rejects_a_broken_compose_file(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["healthcheck"]["intervall"] = "15s"
    broken["services"]["flower"]["ports"] = "5555:5555"
    errors = schema_errors(broken)
    assert any("intervall" in error for error in errors) and any(error.startswith("services/flower/ports") for error in errors)


def test_the_control_plane_and_the_host_workers_are_all_there(compose):
    services = compose["services"]
    assert {"migrate", "api", "control-worker", "beat", "flower", "redis", "postgres", "san-worker", "node-worker"} <= set(services)
    assert services["san-worker"]["profiles"] == ["san"] and services["node-worker"]["profiles"] == ["node"]
    assert services["migrate"]["command"] == ["laxcluster", "db", "upgrade"]
    for name in ("api", "control-worker", "beat", "flower"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_every_long_running_service_has_a_health_check(compose):
    missing = [name for name, service in compose["services"].items()
               if name not in ONE_SHOT and not service.get("healthcheck", {}).get("test")]
    assert missing == []


def test_flower_asks_for_a_password_and_is_published_on_the_hosts_loopback_only(compose):
    flower = compose["services"]["flower"]
    assert "--basic-auth=admin:${FLOWER_PASSWORD:?set FLOWER_PASSWORD}" in flower["command"]
    assert all(str(port).startswith("127.0.0.1:") for port in flower.get("ports", []))


def test_each_worker_takes_its_queue_from_its_environment(compose):
    workers = {name: service for name, service in compose["services"].items() if name.endswith("-worker")}
    queues = {name: service["environment"]["LAXCLUSTER_QUEUE"] for name, service in workers.items()}
    assert queues == {"control-worker": "control", "san-worker": "${LAXCLUSTER_QUEUE:-san.dc1}",
                      "node-worker": "${LAXCLUSTER_QUEUE:-node.server1}"}
    for service in workers.values():
        assert '-Q "$$LAXCLUSTER_QUEUE"' in service["command"][-1]
        assert '$$LAXCLUSTER_QUEUE@' in service["healthcheck"]["test"][-1]


def test_the_shipped_config_loads_and_fills_an_inventory(compose, tmp_path):
    environment = compose["services"]["api"]["environment"]
    db_url = f"sqlite:///{tmp_path / 'inventory.db'}"
    cfg = config.load(DOCKER / "laxcluster.toml", environ={"LAXCLUSTER_DB_URL": db_url, "LAXCLUSTER_REDIS_HOST": "redis"})
    assert set(environment) == {"LAXCLUSTER_DB_URL", "LAXCLUSTER_REDIS_HOST"}
    assert cfg.db_url == db_url and cfg.redis_url.startswith("redis://redis:6379")
    make_celery(cfg)  # every setting the workers and beat read is there
    migrate(db_url)
    engine = make_engine(db_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            sync_from_config(session, cfg)
        with make_session_factory(engine)() as session:
            assert session.scalar(select(func.count()).select_from(ClusterServer)) == 2
            assert session.scalars(select(San.name)).all() == ["san1"]
            assert session.scalars(select(Subnet.name)).all() == ["servers"]
    finally:
        engine.dispose()
