"""The compose file parses and runs every control-plane service (no Docker engine runs here)."""

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.yaml"


def test_compose_names_every_control_plane_service():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"api", "control-worker", "beat", "flower", "redis", "postgres"} <= set(services)


def test_laxcluster_services_use_the_project_image_and_wait_for_migrations():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("api", "control-worker", "beat"):
        assert services[name]["image"] == "laxcluster:latest"
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "--basic-auth=admin:${FLOWER_PASSWORD:?set FLOWER_PASSWORD}" in services["flower"]["command"]
