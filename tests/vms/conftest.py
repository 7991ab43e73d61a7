"""Lab fixtures for VM tests: the lab in the inventory with workers on site-a's queues and `tiny` imported."""

import pytest
from sqlalchemy import select

from api import create_app
from cli.tokens import create_token
from lab.template import build_tiny
from models import VirtualMachine
from models.db import transaction
from tasks.inventory import ipam
from tasks.inventory.config_sync import sync_from_config
from tasks.queues import CONTROL, node_queue, san_queue
from tests.vms.lab_helpers import run_job
from workers.node import domains


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def cluster(rt, celery_app, celery_worker, tiny):
    """The lab in the inventory, with workers on site-a's queues and every server's, fresh server facts and `tiny` imported."""
    with transaction(rt.sessions) as session:
        sync_from_config(session, rt.config)
        ipam.create_subnet(session, name="lan", cidr="192.0.2.0/29", gateway="192.0.2.1", dns=[],
                           range_start="192.0.2.2", range_end="192.0.2.4")
    celery_worker([CONTROL, san_queue("site-a"), node_queue("cs1"), node_queue("cs2"), node_queue("cs3")], concurrency=4)
    run_job(rt, celery_app, "refresh-servers", "servers", CONTROL, {})
    run_job(rt, celery_app, "import-template", "template/san-a/tiny", san_queue("site-a"),
            {"name": "tiny", "san": "san-a", "source_path": str(tiny.disk), "boot": tiny.boot_info()})
    yield rt
    remove_domains_of_this_test(rt)


def remove_domains_of_this_test(rt) -> None:
    """The lab outlives a test: take down the domains its VMs left, so they cost no CPU and no names."""
    with rt.sessions() as session:
        names = list(session.scalars(select(VirtualMachine.name)))
    for _, _, server in rt.config.servers():
        for name in names:
            domains.undefine(server.uri, name)


@pytest.fixture
def api(cluster, celery_app):
    """A Flask test client of the API on the lab's inventory, as an admin."""
    app = create_app(cluster, celery_app)
    with transaction(cluster.sessions) as session:
        token = create_token(session, "admin", "lab-test")
    with app.test_client() as client:
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        yield client
