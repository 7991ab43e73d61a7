"""A daemon a job talks to dies mid-job: a server's libvirtd, the SAN's tgtd. The job must end (within a
minute), whatever it could not undo must be named on the VM (state `error`), and once the daemon is back
the reconciler must finish the undo, leaving the cluster as its inventory says (`laxcluster check`)."""

import os
import signal
import time

import pytest

from lab import cluster as lab_cluster
from lab.processes import wait_until
from models import FAILED, SUCCEEDED, Job
from tests.fixtures.faults import FaultLab
from tests.fixtures.vms import boot_line, install, run_job, server_uri, start_install, unique

pytestmark = [pytest.mark.integration, pytest.mark.lab, pytest.mark.faults]


def phase_of(lab: FaultLab, job_id: str) -> str:
    with lab.rt.sessions() as session:
        return session.get(Job, job_id).phase


def daemon_pid(lab: FaultLab, host: str, daemon: str) -> int:
    hosts = {h["name"]: h for h in lab_cluster.status(lab.rt.config)["hosts"]}
    return next(d["pid"] for d in hosts[host]["daemons"] if d["name"] == daemon)


@pytest.mark.parametrize("host, daemon", [("cs1", "libvirtd"), ("san-a", "tgtd")])
def test_an_install_whose_daemon_dies_ends_and_is_undone_once_it_is_back(fault_lab: FaultLab, host: str, daemon: str):
    lab, name = fault_lab, unique("dd")
    lab.worker.stop()
    lab.restart_worker()  # with beat: the reconciler finishes the undo
    job_id = start_install(lab.rt, lab.celery_app, name, server="cs1").id
    wait_until(lambda: phase_of(lab, job_id) == "prepare disks", 60, "the install to reach the SAN")
    os.kill(daemon_pid(lab, host, daemon), signal.SIGKILL)
    since = time.monotonic()
    try:
        job, seconds = lab.final(job_id, since)
        assert job.state == FAILED, job.error_message
        if job.error_code == "CleanupFailed":
            # `error`, or already `deleting` again: the reconciler may have taken it up meanwhile.
            assert lab.vm_state(name) in ("error", "deleting") and "left behind" in job.error_message
    finally:
        lab_cluster.up(lab.rt.config)
    wait_until(lambda: lab.vm_state(name) is None, 120, f"{name} to be deleted once {daemon} is back")
    lab.assert_clean()
    lab.record(f"{daemon} of {host} killed -9 while an install prepares disks", job, seconds,
               f"VM {'left in error, ' if job.error_code == 'CleanupFailed' else ''}deleted once {daemon} was back; "
               "check clean")


def test_a_start_on_a_san_host_whose_libvirtd_is_gone_fails_and_changes_nothing(fault_lab: FaultLab):
    lab, name = fault_lab, unique("osd")
    assert install(lab.rt, lab.celery_app, name, server="cs1").state == SUCCEEDED
    assert run_job(lab.rt, lab.celery_app, "destroy", {"vm": name}).state == SUCCEEDED
    os.kill(daemon_pid(lab, "san-a", "libvirtd"), signal.SIGKILL)
    try:
        job = run_job(lab.rt, lab.celery_app, "start", {"vm": name, "on_san": True})
        assert (job.state, job.error_code) == (FAILED, "ServerUnreachable")
        assert lab.vm_state(name) == "shut off"
        lab.assert_clean()
    finally:
        lab_cluster.up(lab.rt.config)
    assert run_job(lab.rt, lab.celery_app, "start", {"vm": name}).state == SUCCEEDED
    assert boot_line(server_uri(lab.rt, "cs1"), name)[0] == name
    lab.assert_clean()
    lab.record("libvirtd of san-a killed -9 before a start --on-san", job, "-",
               "start failed (ServerUnreachable); VM shut off, exports open; check clean; starts on cs1")
    assert run_job(lab.rt, lab.celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED
