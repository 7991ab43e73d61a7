"""`vm start --on-san` on the lab: with every server of site-a stopped (each one's daemons and guests killed), a
stopped VM runs on san-a's own libvirtd from its volumes and shows its boot line on the API's console; its
target lets no initiator in meanwhile and a start on a server is refused. Destroyed there, its target lets the
site's servers in again and it starts on cs1 with what it wrote while on the SAN."""

import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from lab import cluster as lab_cluster
from lab import libvirtd, netns, processes
from lab.topology import build
from models import FAILED, SUCCEEDED, VirtualMachine, Volume
from tasks.san.storage import target_for
from tests.fixtures.check import assert_clean
from tests.fixtures.console import console_boot_line
from tests.fixtures.guest import on_disk, read_probe, write_and_sync
from tests.fixtures.vms import boot_line, domain_named, install, run_job, server_uri, unique

pytestmark = [pytest.mark.integration, pytest.mark.lab]


def vm_row(rt, name: str) -> VirtualMachine:
    with rt.sessions() as session:
        return session.scalar(select(VirtualMachine).where(VirtualMachine.name == name))


def acl(rt, name: str) -> tuple[str, ...]:
    """Who san-a's tgtd lets in to the VM's target, and who is logged in."""
    with rt.sessions() as session:
        iqn = session.scalar(select(Volume.iscsi_target).join(VirtualMachine).where(VirtualMachine.name == name,
                                                                                     Volume.role == "disk"))
    target = target_for(rt.config.san("san-a")[1]).find(iqn)
    return tuple(sorted({*target.initiators, *(nexus.initiator for nexus in target.nexuses)}))


@pytest.fixture
def servers_stopped(checked_cluster) -> Iterator[list[str]]:
    """A function stopping every cluster server of site-a (all processes in its namespace: libvirtd, virtlogd,
    guests); whatever happens, the lab is brought up again after the test."""
    rt = checked_cluster
    hosts = [host for host in build(rt.config).servers() if host.site == "site-a"]

    def stop() -> list[str]:
        for host in hosts:
            processes.stop(netns.netns_pids(host.netns))
        return [server_uri(rt, host.name) for host in hosts]

    try:
        yield stop
    finally:
        lab_cluster.up(rt.config)


@pytest.mark.postgres_too
def test_a_vm_runs_on_its_san_host_while_every_server_is_stopped(checked_cluster, celery_app, drift_baseline,
                                                                 servers_stopped, served_api, tokens):
    rt, name = checked_cluster, unique("onsan")
    assert install(rt, celery_app, name, server="cs1").state == SUCCEEDED
    cs1, san_host = server_uri(rt, "cs1"), rt.config.san("san-a")[1].uri
    assert boot_line(cs1, name)[0] == name
    servers = acl(rt, name)
    assert run_job(rt, celery_app, "destroy", {"vm": name}).state == SUCCEEDED

    for uri in servers_stopped():
        assert libvirtd.hostname_over_tcp(uri) is None
    started = run_job(rt, celery_app, "start", {"vm": name, "on_san": True})
    assert started.state == SUCCEEDED, started.error_message
    row = vm_row(rt, name)
    assert (row.state, row.desired_state, started.result["host"]) == ("maintenance", "stopped", "san-a")
    assert acl(rt, name) == ()
    assert console_boot_line(served_api, name, tokens["operator"])[0] == name
    marker = f"after-{secrets.token_hex(6)}"
    assert write_and_sync(san_host, name, marker, timeout=60) and on_disk(rt, name, marker)

    lab_cluster.up(rt.config)
    refused = run_job(rt, celery_app, "start", {"vm": name})
    assert (refused.state, refused.error_code) == (FAILED, "VmInMaintenance")
    assert acl(rt, name) == ()
    assert_clean(rt, celery_app, drift_baseline)

    stopped = run_job(rt, celery_app, "destroy", {"vm": name})
    assert stopped.state == SUCCEEDED, stopped.error_message
    assert vm_row(rt, name).state == "shut off"
    assert domain_named(san_host, name) is None
    assert acl(rt, name) == servers
    assert run_job(rt, celery_app, "start", {"vm": name}).state == SUCCEEDED
    assert boot_line(cs1, name)[0] == name
    assert read_probe(cs1, name) == marker
    assert_clean(rt, celery_app, drift_baseline)
    assert run_job(rt, celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED
