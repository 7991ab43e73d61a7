"""With one control worker slot, workflows that wait for children cannot starve each other: an
evacuation of a server with three VMs (its migrate children run on `control` too) and two installs
started beside it all finish. On the lab, with real live migrations."""

import pytest
from sqlalchemy import select

from models import SUCCEEDED, ClusterServer, Job
from models.db import transaction
from tasks import submission
from tasks.inventory import ipam
from tasks.inventory.config_sync import sync_from_config
from tasks.inventory.vms import InstallRequest, reserve_vm
from tasks.queues import CONTROL, node_queue, san_queue
from tests.fixtures.lab_vms import importable, remove_domains_of_this_test
from tests.fixtures.vms import domain_named, install, run_job, server_uri, unique, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.lab]
TESTER = submission.Requester("test")
MEMORY = 128 << 20


def start_install(rt, celery_app, name: str, server: str) -> Job:
    with transaction(rt.sessions) as session:
        reserve_vm(session, rt.config, InstallRequest(name=name, template="tiny", memory_bytes=MEMORY, vcpus=1,
                                                      disk_bytes=128 << 20, subnet="lan", server=server))
    return submission.start(rt, celery_app, "install-vm", {"vm": name, "disk_bytes": 128 << 20, "server": server},
                            TESTER)


def test_one_control_slot_finishes_an_evacuation_of_three_vms_and_two_installs(rt, celery_app, celery_worker, tiny):
    with transaction(rt.sessions) as session:
        sync_from_config(session, rt.config)
        ipam.create_subnet(session, name="lan", cidr="192.0.2.0/28", gateway="192.0.2.1", dns=[],
                           range_start="192.0.2.2", range_end="192.0.2.14")
    celery_worker([CONTROL], concurrency=1)
    celery_worker([san_queue("site-a"), node_queue("cs1"), node_queue("cs2"), node_queue("cs3")], concurrency=4)
    assert run_job(rt, celery_app, "refresh-servers", {}).state == SUCCEEDED
    assert run_job(rt, celery_app, "import-template", {"name": "tiny", "san": "san-a", "format": "raw",
                                                       "source_path": str(importable(rt, tiny.disk)),
                                                       "boot": tiny.boot_info()}).state == SUCCEEDED
    leaving = [unique("leave") for _ in range(3)]
    arriving = [unique("new") for _ in range(2)]
    try:
        for name in leaving:
            installed = install(rt, celery_app, name, memory=MEMORY, server="cs1")
            assert installed.state == SUCCEEDED, installed.error_message

        evacuation = submission.start(rt, celery_app, "evacuate", {"server": "cs1"}, TESTER)
        installs = [start_install(rt, celery_app, name, "cs2") for name in arriving]
        ended = [wait_job(rt, job.id, timeout=900) for job in [evacuation, *installs]]

        assert [(job.kind, job.state) for job in ended] == [("evacuate", SUCCEEDED)] + [("install-vm", SUCCEEDED)] * 2, \
            [job.error_message for job in ended]
        assert ended[0].result["moved"] == {name: "cs2" for name in leaving}
        cs1, cs2 = server_uri(rt, "cs1"), server_uri(rt, "cs2")
        for name in leaving + arriving:
            assert domain_named(cs2, name).state == "running"
            assert domain_named(cs1, name) is None
    finally:
        with transaction(rt.sessions) as session:
            session.scalar(select(ClusterServer).where(ClusterServer.name == "cs1")).maintenance = False
        for name in leaving + arriving:
            run_job(rt, celery_app, "delete-vm", {"vm": name})
        remove_domains_of_this_test(rt)
