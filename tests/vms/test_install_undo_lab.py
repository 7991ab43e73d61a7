"""An install that fails or is cancelled at any phase leaves no volume, target, lease, domain or VM row."""


import pytest
from sqlalchemy import func, select

from lab.processes import wait_until
from models import CANCELLED, FAILED, Job, Lease, Template, VirtualMachine, Volume
from models.db import transaction
from tasks import jobs
from tasks.dispatch import dispatch
from tasks.queues import CONTROL
from tasks.inventory.vms import InstallRequest, reserve_vm
from tests.fixtures.vms import domain_named, install, san_objects, unique, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.lab]


def assert_nothing_left(rt, name: str, before: set[str]) -> None:
    with rt.sessions() as session:
        for model in (VirtualMachine, Lease, Volume):
            assert session.scalar(select(func.count()).select_from(model)) == 0, model.__name__
    for _, _, server in rt.config.servers():
        assert domain_named(server.uri, name) is None, server.name
    assert san_objects(rt) == before


def test_a_failure_preparing_disks_is_undone(cluster, celery_app):
    rt = cluster
    with transaction(rt.sessions) as session:
        session.scalar(select(Template).where(Template.name == "tiny")).backend_handle = "tpl-missing"
    name, before = unique("nodisk"), san_objects(rt)
    job = install(rt, celery_app, name)
    assert (job.state, job.error_code) == (FAILED, "VolumeNotFound")
    assert_nothing_left(rt, name, before)


def test_a_failure_starting_the_domain_is_undone(cluster, celery_app):
    rt = cluster
    with transaction(rt.sessions) as session:
        template = session.scalar(select(Template).where(Template.name == "tiny"))
        template.boot = {**template.boot, "kernel": "/nonexistent/vmlinuz"}
    name, before = unique("noboot"), san_objects(rt)
    job = install(rt, celery_app, name)
    assert (job.state, job.error_code) == (FAILED, "DomainFailed")
    assert "start-domain" in job.error_message
    assert_nothing_left(rt, name, before)


@pytest.mark.postgres_too
def test_a_cancelled_install_is_undone(cluster, celery_app):
    rt = cluster
    name, before = unique("cancel"), san_objects(rt)
    with transaction(rt.sessions) as session:
        reserve_vm(session, rt.config, InstallRequest(name=name, template="tiny", memory_bytes=256 << 20, vcpus=1,
                                                      disk_bytes=128 << 20, subnet="lan"))
        job, _ = jobs.submit(session, kind="install-vm", target=f"vm/{name}", queue=CONTROL,
                             params={"vm": name, "disk_bytes": 128 << 20})
    dispatch(celery_app, job)

    def phase() -> str:
        with rt.sessions() as session:
            return session.get(Job, job.id).phase

    wait_until(lambda: phase() in ("prepare disks", "define and start"), 60, "the install to reach the SAN")
    with transaction(rt.sessions) as session:
        jobs.request_cancel(session, rt.redis, job.id)

    assert wait_job(rt, job.id).state == CANCELLED
    assert_nothing_left(rt, name, before)
