"""Faults of DR replication and failover: the worker killed -9 while a ship streams or records, or while a failover
promotes the replica; the DR SAN's sshd gone during a ship. Each job ends (a ship re-runs to the same point or
fails keeping the base), no half-applied point is ever the newest, and `laxcluster check` is clean."""

import os
import signal

import pytest
from sqlalchemy import select

from lab import cluster as lab_cluster
from models import FAILED, SUCCEEDED, San, VirtualMachine
from models.db import transaction
from models.protection import Replication
from tasks import submission
from tasks.inventory.dr import points, replication_of
from tests.fixtures.faults import FaultLab
from tests.fixtures.guest import read_probe, write_and_sync
from tests.fixtures.vms import boot_line, install, run_job, server_uri, unique

pytestmark = [pytest.mark.integration, pytest.mark.lab, pytest.mark.faults]


def replicated(lab: FaultLab, prefix: str) -> str:
    """A VM on cs1, replicated to san-b on a schedule that never comes (ships only when a test asks), shipped once."""
    name = unique(prefix)
    assert install(lab.rt, lab.celery_app, name, server="cs1").state == SUCCEEDED
    assert boot_line(server_uri(lab.rt, "cs1"), name)[0] == name
    with transaction(lab.rt.sessions) as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == name))
        peer = session.scalar(select(San.id).where(San.name == "san-b"))
        session.add(Replication(vm_id=vm.id, peer_san_id=peer, mode="scheduled", schedule="0 0 1 1 *", rpo_target_s=60))
    first = run_job(lab.rt, lab.celery_app, "replicate-to-dr", {"vm": name})
    assert first.state == SUCCEEDED, first.error_message
    return name


def newest_point(lab: FaultLab, name: str) -> str | None:
    with lab.rt.sessions() as session:
        held = points(session, replication_of(session, session.scalar(select(VirtualMachine).where(VirtualMachine.name == name))))
        return held[0].name if held else None


def start(lab: FaultLab, kind: str, params: dict) -> str:
    return submission.start(lab.rt, lab.celery_app, kind, params, submission.Requester("fault-suite")).id


def daemon_pid(lab: FaultLab, host: str, daemon: str) -> int:
    hosts = {h["name"]: h for h in lab_cluster.status(lab.rt.config)["hosts"]}
    return next(d["pid"] for d in hosts[host]["daemons"] if d["name"] == daemon)


@pytest.mark.parametrize("phase", ["ship", "record"])
def test_a_ship_survives_a_crash(fault_lab: FaultLab, phase: str):
    lab = fault_lab
    name = replicated(lab, "shipc")
    before = newest_point(lab, name)
    marker = f"before-{os.urandom(6).hex()}"
    assert write_and_sync(server_uri(lab.rt, "cs1"), name, marker, timeout=60)
    lab.crash_worker_at("replicate-to-dr", phase)
    job_id = start(lab, "replicate-to-dr", {"vm": name})
    lab.wait_for_the_crash(job_id, f"replicate-to-dr/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    assert job.state == SUCCEEDED, job.error_message
    assert newest_point(lab, name) == job.result["point"] != before
    assert job.result["bytes_changed"] < 64 << 20, job.result
    lab.assert_clean()
    lab.record(f"worker killed -9 at replicate-to-dr / {phase}", job, seconds,
               "re-run to the same point; delta only; check clean")
    assert run_job(lab.rt, lab.celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED


@pytest.mark.parametrize("kind, phase", [
    ("failover", "promote the replica"),   # control: the old copy retired, the replica not yet promoted
    ("promote-replica", "export"),         # the DR SAN: volumes made from the point, not yet exported
])
def test_a_failover_survives_a_crash(fault_lab: FaultLab, kind: str, phase: str):
    lab = fault_lab
    name = replicated(lab, "foc")
    marker = f"before-{os.urandom(6).hex()}"
    assert write_and_sync(server_uri(lab.rt, "cs1"), name, marker, timeout=60)
    lab.crash_worker_at(kind, phase)
    job_id = start(lab, "failover", {"vm": name})
    lab.wait_for_the_crash(job_id, f"{kind}/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    assert job.state == SUCCEEDED, job.error_message
    cs3 = server_uri(lab.rt, "cs3")
    assert boot_line(cs3, name)[0] == name and read_probe(cs3, name) == marker
    lab.assert_clean()
    lab.record(f"worker killed -9 at {kind} / {phase} (planned failover)", job, seconds,
               "re-run; VM on cs3 with its last write; check clean")
    assert run_job(lab.rt, lab.celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED


def test_a_ship_to_a_dr_san_whose_sshd_is_gone_fails_and_keeps_the_base(fault_lab: FaultLab):
    lab = fault_lab
    name = replicated(lab, "shipd")
    before = newest_point(lab, name)
    os.kill(daemon_pid(lab, "san-b", "sshd"), signal.SIGKILL)
    try:
        job = run_job(lab.rt, lab.celery_app, "replicate-to-dr", {"vm": name})
        assert (job.state, job.error_code) == (FAILED, "PeerUnreachable"), job.error_message
        assert newest_point(lab, name) == before
        lab.assert_clean()
    finally:
        lab_cluster.up(lab.rt.config)
    again = run_job(lab.rt, lab.celery_app, "replicate-to-dr", {"vm": name})
    assert again.state == SUCCEEDED, again.error_message
    assert again.result["full"] == [] and again.result["bytes_changed"] < 64 << 20, again.result
    lab.assert_clean()
    lab.record("sshd of san-b killed -9 before a ship", job, "-",
               "ship failed (PeerUnreachable), base kept; the next ship is a delta; check clean")
    assert run_job(lab.rt, lab.celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED
