"""An install that fails or is cancelled at any phase leaves no volume, target, lease, domain or VM row."""

from pathlib import Path

import pytest
from sqlalchemy import func, select

from lab.processes import wait_until
from models import CANCELLED, FAILED, Job, Lease, Template, VirtualMachine, Volume
from models.db import transaction
from tasks import jobs
from tasks.dispatch import dispatch
from tasks.queues import CONTROL
from tasks.san.storage import target_for
from tasks.inventory.vms import InstallRequest, reserve_vm
from tests.fixtures.vms import install, unique, wait_job
from workers.node import domains

pytestmark = [pytest.mark.integration, pytest.mark.lab]


def assert_nothing_left(rt, name: str) -> None:
    with rt.sessions() as session:
        for model in (VirtualMachine, Lease, Volume):
            assert session.scalar(select(func.count()).select_from(model)) == 0, model.__name__
    for _, _, server in rt.config.servers():
        assert domains.domain_state(server.uri, name) is None, server.name
    _, san = rt.config.san("san-a")
    assert not [t.iqn for t in target_for(san).list_targets() if t.iqn.endswith(f".{name}")]
    assert not list(Path(san.pool_path).glob(f"{name}-*"))


def test_a_failure_preparing_disks_is_undone(cluster, celery_app):
    rt = cluster
    with transaction(rt.sessions) as session:
        session.scalar(select(Template).where(Template.name == "tiny")).backend_handle = "tpl-missing"
    name = unique("nodisk")
    job = install(rt, celery_app, name)
    assert (job.state, job.error_code) == (FAILED, "VolumeNotFound")
    assert_nothing_left(rt, name)


def test_a_failure_starting_the_domain_is_undone(cluster, celery_app):
    rt = cluster
    with transaction(rt.sessions) as session:
        template = session.scalar(select(Template).where(Template.name == "tiny"))
        template.boot = {**template.boot, "kernel": "/nonexistent/vmlinuz"}
    name = unique("noboot")
    job = install(rt, celery_app, name)
    assert (job.state, job.error_code) == (FAILED, "DomainFailed")
    assert "start-domain" in job.error_message
    assert_nothing_left(rt, name)


def test_a_cancelled_install_is_undone(cluster, celery_app):
    rt = cluster
    name = unique("cancel")
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
    assert_nothing_left(rt, name)
