"""migrate and evacuate on the lab: real live migration between the cs1 and cs2 libvirtds, a TCG guest
whose disk is an iSCSI LUN on san-a."""

import os
import secrets
import signal

import libvirt
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from cli.main import cli
from lab import cluster as lab_cluster
from lab.processes import read_pidfile, wait_until
from lab.topology import lab_dir
from models import CANCELLED, FAILED, SUCCEEDED, ClusterServer, Job, VirtualMachine
from models.db import transaction
from tasks import jobs
from tasks.dispatch import dispatch
from tasks.queues import CONTROL
from tasks.inventory.vms import InstallRequest, reserve_vm
from tests.fixtures.vms import boot_line, libvirt_state, moves_live, run_job, server_uri
from workers.node.host import connect

pytestmark = [pytest.mark.integration, pytest.mark.lab]
MIGRATE_TIMEOUT = 300


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(2)}"


def install_on(rt, celery_app, name: str, server: str, memory: int = 256 << 20) -> Job:
    """Install a tiny VM on `server` (the install job's `server` parameter, as the API passes it)."""
    with transaction(rt.sessions) as session:
        reserve_vm(session, rt.config, InstallRequest(name=name, template="tiny", memory_bytes=memory, vcpus=1,
                                                      disk_bytes=128 << 20, subnet="lan", server=server))
    installed = run_job(rt, celery_app, "install-vm", {"vm": name, "disk_bytes": 128 << 20, "server": server})
    assert installed.state == SUCCEEDED, installed.error_message
    assert db_server(rt, name) == server
    return installed


def migrate(rt, celery_app, name, **params) -> Job:
    return run_job(rt, celery_app, "migrate", {"vm": name, **params}, timeout=MIGRATE_TIMEOUT)


def laxcluster(api_url, tokens, *args):
    """Run the CLI against the served API as an operator."""
    return CliRunner().invoke(cli, ["--url", api_url, "--token", tokens["operator"], *args], catch_exceptions=False)


def submit(rt, celery_app, kind, target, params) -> str:
    with transaction(rt.sessions) as session:
        job, _ = jobs.submit(session, kind=kind, target=target, queue=CONTROL, params=params)
    dispatch(celery_app, job)
    return job.id


def final(rt, job_id, timeout=MIGRATE_TIMEOUT) -> Job:
    def ended():
        with rt.sessions() as session:
            job = session.get(Job, job_id)
            return job if job.is_final else None

    return wait_until(ended, timeout, f"job {job_id} to end")


def migration_active(uri: str, name: str) -> bool:
    conn = connect(uri)
    try:
        return conn.lookupByName(name).jobStats().get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
    finally:
        conn.close()


def db_server(rt, name: str) -> str:
    with rt.sessions() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == name))
        return session.get(ClusterServer, vm.server_id).name


def set_server(rt, name: str, **fields) -> None:
    with transaction(rt.sessions) as session:
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == name))
        for field, value in fields.items():
            setattr(server, field, value)


def assert_runs_only_on(rt, name: str, server: str, other: str) -> None:
    assert libvirt_state(server_uri(rt, server), name) == libvirt.VIR_DOMAIN_RUNNING
    assert libvirt_state(server_uri(rt, other), name) is None
    assert db_server(rt, name) == server


@pytest.mark.postgres_too
def test_preflight_cancel_and_live_migration(cluster, celery_app, api_url, tokens):
    rt, name = cluster, unique("mig")
    install_on(rt, celery_app, name, "cs1")
    cs1, cs2 = server_uri(rt, "cs1"), server_uri(rt, "cs2")

    # Pre-flight: every problem at once, each readable; nothing moves.
    set_server(rt, "cs2", maintenance=True, memory_limit_bytes=128 << 20)
    refused = migrate(rt, celery_app, name, to="cs2")
    assert (refused.state, refused.error_code) == (FAILED, "PreflightFailed")
    problems = {p["code"]: p["message"] for p in refused.result["problems"]}
    assert set(problems) == {"ServerInMaintenance", "NotEnoughMemory"}
    assert "needs 256 MiB" in problems["NotEnoughMemory"] and "cs2" in problems["ServerInMaintenance"]
    assert_runs_only_on(rt, name, "cs1", "cs2")
    set_server(rt, "cs2", maintenance=False, memory_limit_bytes=2 << 30)
    checked = laxcluster(api_url, tokens, "vm", "migrate", name, "--to", "cs2", "--check")
    assert checked.exit_code == 0 and f"no problems: {name} can move from cs1 to cs2" in checked.output, checked.output
    assert_runs_only_on(rt, name, "cs1", "cs2")

    # Cancel while libvirt's migration job runs (throttled to 1 MiB/s so it lasts): it stays on cs1.
    job_id = submit(rt, celery_app, "migrate", f"vm/{name}", {"vm": name, "to": "cs2", "bandwidth_mib_s": 1})
    wait_until(lambda: migration_active(cs1, name), 120, "the libvirt migration job on cs1")
    with transaction(rt.sessions) as session:
        jobs.request_cancel(session, rt.redis, job_id)
    cancelled = final(rt, job_id)
    assert cancelled.state == CANCELLED, cancelled.error_message
    assert_runs_only_on(rt, name, "cs1", "cs2")

    # Live to cs2: it keeps running there, its console answers, the job shows the downtime. A TCG guest of
    # QEMU before 9.0 (this machine's) moves paused instead, and the job and the CLI say why.
    live = moves_live(cs1, name)
    watched = laxcluster(api_url, tokens, "vm", "migrate", name, "--to", "cs2", "--watch")
    assert watched.exit_code == 0 and f"{name} runs on cs2: downtime " in watched.output, watched.output
    assert (f"{name} was moved paused: QEMU before 9.0" in watched.output) is not live, watched.output
    assert_runs_only_on(rt, name, "cs2", "cs1")
    with rt.sessions() as session:
        moved = session.scalars(select(Job).where(Job.kind == "migrate", Job.target == f"vm/{name}")
                                .order_by(Job.created_at.desc())).first()
    assert moved.state == SUCCEEDED and moved.result["destination"] == "cs2"
    assert moved.result["live"] is live and (moved.result["paused_because"] is None) is live
    assert isinstance(moved.result["downtime_ms"], int) and moved.result["downtime_ms"] >= 0
    assert moved.result["total_ms"] >= moved.result["migration_ms"] >= moved.result["downtime_ms"]
    assert boot_line(cs2, name)[0] == name

    # Stopped, it moves offline: only the definition changes server.
    assert run_job(rt, celery_app, "destroy", {"vm": name}).state == SUCCEEDED
    offline = migrate(rt, celery_app, name, to="cs1")
    assert offline.state == SUCCEEDED and offline.result["downtime_ms"] is None, offline.error_message
    assert libvirt_state(cs1, name) == libvirt.VIR_DOMAIN_SHUTOFF and libvirt_state(cs2, name) is None
    assert db_server(rt, name) == "cs1"

    run_job(rt, celery_app, "delete-vm", {"vm": name})
    assert libvirt_state(cs1, name) is None


def test_a_destination_lost_mid_migration_leaves_the_vm_on_the_source(cluster, celery_app):
    rt, name = cluster, unique("mik")
    install_on(rt, celery_app, name, "cs1")
    cs1, cs2 = server_uri(rt, "cs1"), server_uri(rt, "cs2")
    job_id = submit(rt, celery_app, "migrate", f"vm/{name}", {"vm": name, "to": "cs2", "bandwidth_mib_s": 1})
    try:
        wait_until(lambda: migration_active(cs1, name), 120, "the libvirt migration job on cs1")
        os.kill(read_pidfile(lab_dir(rt.config) / "cs2" / "pids" / "libvirtd.pid"), signal.SIGKILL)
        ended = final(rt, job_id)
        assert ended.state == FAILED and ended.error_code == "MigrationFailed", (ended.state, ended.error_message)
        assert libvirt_state(cs1, name) == libvirt.VIR_DOMAIN_RUNNING and db_server(rt, name) == "cs1"
    finally:
        lab_cluster.up(rt.config)  # starts cs2's libvirtd again
    # Back up, cs2's libvirtd drops the guest whose incoming migration never finished.
    wait_until(lambda: libvirt_state(cs2, name) is None, 60, f"cs2 to drop the half-migrated {name}")
    assert boot_line(cs1, name)[0] == name
    run_job(rt, celery_app, "delete-vm", {"vm": name})


@pytest.mark.postgres_too
def test_evacuate_moves_every_vm_off_the_server(cluster, celery_app, api_url, tokens):
    rt = cluster
    small, big = unique("eva"), unique("evb")
    names = [small, big]
    install_on(rt, celery_app, small, "cs1")
    install_on(rt, celery_app, big, "cs1", memory=512 << 20)
    try:
        # cs2 has room for the small one only: the big one is reported and keeps running on cs1.
        set_server(rt, "cs2", memory_limit_bytes=400 << 20)
        partly = laxcluster(api_url, tokens, "server", "evacuate", "cs1", "--watch")
        assert partly.exit_code == 1 and "EvacuationIncomplete" in partly.output, partly.output
        with rt.sessions() as session:
            job = session.scalar(select(Job).where(Job.kind == "evacuate"))
        assert job.result["moved"] == {small: "cs2"} and list(job.result["failed"]) == [big]
        assert "512 MiB" in job.result["failed"][big]
        assert_runs_only_on(rt, small, "cs2", "cs1")
        assert_runs_only_on(rt, big, "cs1", "cs2")

        set_server(rt, "cs2", memory_limit_bytes=2 << 30)
        evacuated = laxcluster(api_url, tokens, "server", "evacuate", "cs1", "--watch")
        assert evacuated.exit_code == 0, evacuated.output
        with rt.sessions() as session:
            job = session.scalars(select(Job).where(Job.kind == "evacuate").order_by(Job.created_at.desc())).first()
        assert job.result["moved"] == {big: "cs2"} and job.result["failed"] == {}
        for name in names:
            assert_runs_only_on(rt, name, "cs2", "cs1")
        with rt.sessions() as session:
            assert session.scalar(select(ClusterServer.maintenance).where(ClusterServer.name == "cs1")) is True
    finally:
        set_server(rt, "cs2", memory_limit_bytes=2 << 30)
        assert laxcluster(api_url, tokens, "server", "activate", "cs1", "--watch").exit_code == 0
        for name in names:
            run_job(rt, celery_app, "delete-vm", {"vm": name})
