"""install-vm and delete-vm end to end on the lab: real SAN volumes, tgt targets, libvirtds and a TCG guest."""


import pytest
from sqlalchemy import func, select

from errors import NoCapacity
from models import SUCCEEDED, Lease, VirtualMachine, Volume
from cli.tokens import create_token
from models.db import transaction
from tests.fixtures.console import console_boot_line
from tests.fixtures.vms import domain_named, install, run_job, san_objects, server_uri, unique

pytestmark = [pytest.mark.integration, pytest.mark.lab]


@pytest.mark.postgres_too
def test_install_boots_a_customized_vm_and_delete_leaves_nothing(cluster, celery_app, served_api):
    rt = cluster
    web1, before = unique("web1"), san_objects(rt)
    job = install(rt, celery_app, web1, server="cs1")
    assert job.state == SUCCEEDED, job.error_message
    with rt.sessions() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == web1))
        lease = session.scalar(select(Lease).where(Lease.vm_id == vm.id))
        assert vm.state == "running" and lease.ip == "192.0.2.2"
    with transaction(rt.sessions) as session:
        token = create_token(session, "operator", "console-test")
    assert console_boot_line(served_api, web1, token) == (web1, "192.0.2.2")

    assert job.result["server"] == "cs1"
    uri = server_uri(rt, "cs1")
    deleted = run_job(rt, celery_app, "delete-vm", {"vm": web1})
    assert deleted.state == SUCCEEDED, deleted.error_message
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(VirtualMachine)) == 0
        assert session.scalar(select(func.count()).select_from(Lease)) == 0
        assert session.scalar(select(func.count()).select_from(Volume)) == 0
    assert domain_named(uri, web1) is None
    assert san_objects(rt) == before


def test_a_failed_install_is_undone(cluster, celery_app):
    rt = cluster
    job = install(rt, celery_app, unique("huge"), memory=64 << 30)
    assert (job.state, job.error_code) == ("failed", NoCapacity.code)
    assert "MiB" in job.error_message
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(VirtualMachine)) == 0
        assert session.scalar(select(func.count()).select_from(Lease)) == 0
