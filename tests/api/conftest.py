"""API fixtures: the app on the test's DB and Redis, a test client, and a token for each role."""

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from api import create_app
from cli.tokens import create_token
from models import ROLES
from models.db import transaction
from tasks.inventory.config_sync import sync_from_config
from tasks.runtime import Runtime


@pytest.fixture
def app(rt: Runtime, celery_app) -> Flask:
    """The API on this test's runtime, its inventory filled from the config (sites, clusters, servers, SANs)."""
    with transaction(rt.sessions) as session:
        sync_from_config(session, rt.config)
    app = create_app(rt, celery_app)
    app.config["SSE_KEEPALIVE_S"] = 1.0
    return app


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as test_client:
        yield test_client


@pytest.fixture
def tokens(rt: Runtime) -> dict[str, str]:
    """role -> secret of a fresh token named test-<role>."""
    with transaction(rt.sessions) as session:
        return {role: create_token(session, role, f"test-{role}") for role in ROLES}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}
