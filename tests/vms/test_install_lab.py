"""install-vm and delete-vm end to end on the lab: real SAN volumes, tgt targets, libvirtds and a TCG guest."""

import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from lab.template import build_tiny
from models import SUCCEEDED, Job, Lease, VirtualMachine, Volume
from models.db import transaction
from tasks import ipam, jobs
from tasks.dispatch import dispatch
from tasks.inventory import sync_from_config
from tasks.placement import NoCapacity
from tasks.queues import CONTROL, node_queue, san_queue
from tasks.storage import target_for
from tasks.vms import InstallRequest, reserve_vm
from tests.support import wait_for
from workers.node import domains
from workers.node.console import ConsoleTimeout, SerialConsole, start_event_loop
from workers.node.host import connect

pytestmark = [pytest.mark.integration, pytest.mark.lab]
BOOT_LINE = r"LAXCLUSTER-BOOT hostname=(\S+) ip=(\S+)"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def cluster(rt, celery_app, celery_worker, tiny):
    """The lab in the inventory, with workers on every site-a queue, fresh server facts and `tiny` imported."""
    with transaction(rt.sessions) as session:
        sync_from_config(session, rt.config)
        ipam.create_subnet(session, name="lan", cidr="192.0.2.0/29", gateway="192.0.2.1", dns=[],
                           range_start="192.0.2.2", range_end="192.0.2.4")
    celery_worker([CONTROL, san_queue("site-a"), node_queue("cs1"), node_queue("cs2")], concurrency=4)
    run_job(rt, celery_app, "refresh-servers", "servers", CONTROL, {})
    boot = {"kernel": str(tiny.kernel), "initrd": str(tiny.initrd), "cmdline": tiny.cmdline}
    run_job(rt, celery_app, "import-template", "template/san-a/tiny", san_queue("site-a"),
            {"name": "tiny", "san": "san-a", "source_path": str(tiny.disk), "boot": boot})
    return rt


def run_job(rt, celery_app, kind, target, queue, params, timeout=180) -> Job:
    with transaction(rt.sessions) as session:
        job, _ = jobs.submit(session, kind=kind, target=target, queue=queue, params=params)
    dispatch(celery_app, job)

    def ended():
        with rt.sessions() as session:
            current = session.get(Job, job.id)
            return current if current.is_final else None

    return wait_for(ended, timeout, f"{kind} job to end")


def install(rt, celery_app, name, memory=256 << 20, **extra) -> Job:
    with transaction(rt.sessions) as session:
        reserve_vm(session, rt.config, InstallRequest(name=name, template="tiny", memory_bytes=memory, vcpus=1,
                                                      disk_bytes=128 << 20, subnet="lan", **extra))
    return run_job(rt, celery_app, "install-vm", f"vm/{name}", CONTROL, {"vm": name, "disk_bytes": 128 << 20})


def boot_line(uri: str, name: str) -> tuple[str, str]:
    """Ask the guest's console shell for the boot line until the guest has printed it."""
    start_event_loop()
    conn = connect(uri)
    try:
        with SerialConsole(conn.lookupByName(name)) as console:
            def asked() -> re.Match | None:
                console.write(b"cat /etc/laxcluster-boot\n")
                try:
                    return console.read_until(BOOT_LINE, timeout=3)
                except ConsoleTimeout:
                    return None

            return wait_for(asked, 120, f"the boot line on {name}'s console").groups()
    finally:
        conn.close()


def server_uri(rt, name):
    return next(s.uri for _, _, s in rt.config.servers() if s.name == name)


def test_install_boots_a_customized_vm_and_delete_leaves_nothing(cluster, celery_app):
    rt = cluster
    job = install(rt, celery_app, "web1")
    assert job.state == SUCCEEDED, job.error_message
    with rt.sessions() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == "web1"))
        lease = session.scalar(select(Lease).where(Lease.vm_id == vm.id))
        assert vm.state == "running" and lease.ip == "192.0.2.2"
    uri = server_uri(rt, job.result["server"])
    assert boot_line(uri, "web1") == ("web1", "192.0.2.2")

    deleted = run_job(rt, celery_app, "delete-vm", "vm/web1", CONTROL, {"vm": "web1"})
    assert deleted.state == SUCCEEDED, deleted.error_message
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(VirtualMachine)) == 0
        assert session.scalar(select(func.count()).select_from(Lease)) == 0
        assert session.scalar(select(func.count()).select_from(Volume)) == 0
    assert domains.domain_state(uri, "web1") is None
    _, san = rt.config.san("san-a")
    assert not [t for t in target_for(san).list_targets() if t.iqn.endswith(".web1")]
    assert not list(Path(san.pool_path).glob("web1-*"))


def test_a_failed_install_is_undone(cluster, celery_app):
    rt = cluster
    job = install(rt, celery_app, "huge", memory=64 << 30)
    assert (job.state, job.error_code) == ("failed", NoCapacity.code)
    assert "MiB" in job.error_message
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(VirtualMachine)) == 0
        assert session.scalar(select(func.count()).select_from(Lease)) == 0
