"""A daemon a job talks to dies mid-job: a server's libvirtd, the SAN's tgtd. The job must end (within a
minute), whatever it could not undo must be named on the VM (state `error`), and once the daemon is back
the reconciler must finish the undo, leaving the cluster as its inventory says (`laxcluster check`)."""

import os
import signal
import time

import pytest
from sqlalchemy import select

from lab import cluster as lab_cluster
from lab.processes import wait_until
from models import FAILED, Job, VirtualMachine
from tests.fixtures.faults import FaultLab
from tests.fixtures.vms import start_install, unique

pytestmark = [pytest.mark.integration, pytest.mark.lab, pytest.mark.faults]


def phase_of(lab: FaultLab, job_id: str) -> str:
    with lab.rt.sessions() as session:
        return session.get(Job, job_id).phase


def daemon_pid(lab: FaultLab, host: str, daemon: str) -> int:
    hosts = {h["name"]: h for h in lab_cluster.status(lab.rt.config)["hosts"]}
    return next(d["pid"] for d in hosts[host]["daemons"] if d["name"] == daemon)


def vm_state(lab: FaultLab, name: str) -> str | None:
    with lab.rt.sessions() as session:
        return session.scalar(select(VirtualMachine.state).where(VirtualMachine.name == name))


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
            assert vm_state(lab, name) in ("error", "deleting") and "left behind" in job.error_message
    finally:
        lab_cluster.up(lab.rt.config)
    wait_until(lambda: vm_state(lab, name) is None, 120, f"{name} to be deleted once {daemon} is back")
    lab.assert_clean()
    lab.record(f"{daemon} of {host} killed -9 while an install prepares disks", job, seconds,
               f"VM {'left in error, ' if job.error_code == 'CleanupFailed' else ''}deleted once {daemon} was back; "
               "check clean")
