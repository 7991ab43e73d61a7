"""The worker running a job is killed -9 at one of its phases (the whole worker, as a machine crash would);
a new worker comes up. The job must be final within a minute, the cluster must match its inventory
(`laxcluster check`), and a VM the job left running must work."""

import pytest
from sqlalchemy import select

from models import SUCCEEDED, ClusterServer, VirtualMachine
from models.db import transaction
from models.protection import Backup, BackupPolicy, BackupStore
from tasks import submission
from tests.fixtures.faults import FaultLab
from tests.fixtures.vms import boot_line, console_answer, install, run_job, server_uri, start_install, unique

pytestmark = [pytest.mark.integration, pytest.mark.lab, pytest.mark.faults]


def vm_server(lab: FaultLab, name: str) -> str | None:
    """The server the inventory places VM `name` on (None: no such VM, or not placed)."""
    with lab.rt.sessions() as session:
        return session.scalar(select(ClusterServer.name).join(VirtualMachine, VirtualMachine.server_id == ClusterServer.id)
                              .where(VirtualMachine.name == name))


def assert_vm_works(lab: FaultLab, name: str) -> str:
    server = vm_server(lab, name)
    assert boot_line(server_uri(lab.rt, server), name)[0] == name
    return f"{name} boots on {server}"


@pytest.fixture
def local_store(fault_lab: FaultLab, tmp_path) -> str:
    """The default backup store `local`, a directory on the SAN host."""
    with transaction(fault_lab.rt.sessions) as session:
        session.add(BackupStore(name="local", kind="local", location=str(tmp_path / "store")))
    return "local"


def start(lab: FaultLab, kind: str, params: dict) -> str:
    return submission.start(lab.rt, lab.celery_app, kind, params, submission.Requester("fault-suite")).id


@pytest.mark.parametrize("kind, phase", [
    ("install-vm", "prepare disks"),       # the control workflow, while it starts its SAN child
    ("prepare-vm-disks", "write seed"),    # the SAN, between the clone and the export
    ("start-domain", "start"),             # the node, with the domain defined but not started
])
def test_install_survives_a_crash(fault_lab: FaultLab, kind: str, phase: str):
    lab, name = fault_lab, unique("crash")
    lab.crash_worker_at(kind, phase)
    job_id = start_install(lab.rt, lab.celery_app, name).id
    lab.wait_for_the_crash(job_id, f"{kind}/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    assert job.state == SUCCEEDED, job.error_message
    works = assert_vm_works(lab, name)
    lab.assert_clean()
    lab.record(f"worker killed -9 at {kind} / {phase} (install)", job, seconds, f"re-run; {works}; check clean")


@pytest.mark.parametrize("kind, phase", [("remove-vm-disks", "unexport"), ("remove-vm-disks", "delete volumes")])
def test_delete_survives_a_crash(fault_lab: FaultLab, kind: str, phase: str):
    lab, name = fault_lab, unique("gone")
    assert install(lab.rt, lab.celery_app, name).state == SUCCEEDED
    lab.crash_worker_at(kind, phase)
    job_id = start(lab, "delete-vm", {"vm": name})
    lab.wait_for_the_crash(job_id, f"{kind}/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    assert job.state == SUCCEEDED, job.error_message
    with lab.rt.sessions() as session:
        assert session.scalar(select(VirtualMachine.id).where(VirtualMachine.name == name)) is None
    lab.assert_clean()
    lab.record(f"worker killed -9 at {kind} / {phase} (delete)", job, seconds, "re-run; VM gone; check clean")


@pytest.mark.parametrize("kind, phase", [("create-data-disk", "export"), ("attach-disk", "attach")])
def test_add_disk_survives_a_crash(fault_lab: FaultLab, kind: str, phase: str):
    lab, name = fault_lab, unique("dsk")
    assert install(lab.rt, lab.celery_app, name).state == SUCCEEDED
    lab.crash_worker_at(kind, phase)
    job_id = start(lab, "add-disk", {"vm": name, "size_bytes": 64 << 20})
    lab.wait_for_the_crash(job_id, f"{kind}/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    assert job.state == SUCCEEDED, job.error_message
    assert (job.result["lun"], job.result["attached"]) == (3, "hot-plugged")
    lab.assert_clean()
    removed = run_job(lab.rt, lab.celery_app, "remove-disk", {"vm": name, "volume_id": job.result["disk"]})
    assert removed.state == SUCCEEDED, removed.error_message
    lab.assert_clean()
    lab.record(f"worker killed -9 at {kind} / {phase} (add-disk)", job, seconds,
               "re-run; disk hot-plugged as LUN 3; check clean; removed; check clean")


@pytest.mark.parametrize("kind, phase", [("migrate", "export storage"), ("migrate-domain", "transfer memory")])
def test_migrate_survives_a_crash(fault_lab: FaultLab, kind: str, phase: str):
    lab, name = fault_lab, unique("move")
    assert install(lab.rt, lab.celery_app, name, server="cs1").state == SUCCEEDED
    lab.crash_worker_at(kind, phase)
    job_id = start(lab, "migrate", {"vm": name, "to": "cs2"})
    lab.wait_for_the_crash(job_id, f"{kind}/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    # A migration is never run twice: it is rolled back, and the VM runs where the settle found it.
    assert (job.state, job.error_code) == ("failed", "WorkerLost"), job.error_message
    works = assert_vm_works(lab, name)
    lab.assert_clean()
    lab.record(f"worker killed -9 at {kind} / {phase} (migrate)", job, seconds, f"rolled back; {works}; check clean")


def backed_up(lab: FaultLab, name: str, mode: str = "full") -> str:
    """A backup of the VM (`full` or `diff`); its backup id."""
    job = run_job(lab.rt, lab.celery_app, "snapshot-backup", {"vm": name, "mode": mode})
    assert job.state == SUCCEEDED, job.error_message
    return job.result["backups"][0]["id"]


@pytest.mark.parametrize("mode, phase", [("full", "snapshot"), ("full", "record"), ("diff", "snapshot"),
                                         ("diff", "record")])
def test_backup_survives_a_crash(fault_lab: FaultLab, local_store: str, mode: str, phase: str):
    lab, name = fault_lab, unique("bk")
    assert install(lab.rt, lab.celery_app, name).state == SUCCEEDED
    if mode == "diff":
        backed_up(lab, name)
    lab.crash_worker_at("snapshot-backup", phase)
    job_id = start(lab, "snapshot-backup", {"vm": name, "mode": mode})
    lab.wait_for_the_crash(job_id, f"snapshot-backup/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    assert job.state == SUCCEEDED, job.error_message
    assert job.result["backups"][0]["mode"] == mode
    verified = run_job(lab.rt, lab.celery_app, "verify-backup", {"backup": job.result["backups"][0]["id"]})
    assert verified.state == SUCCEEDED, verified.error_message
    lab.assert_clean()
    lab.record(f"worker killed -9 at snapshot-backup / {phase} ({mode} backup)", job, seconds,
               "re-run; backup verifies; check clean")


@pytest.mark.parametrize("phase", ["delete backups", "collect garbage"])
def test_prune_survives_a_crash(fault_lab: FaultLab, local_store: str, phase: str):
    lab, name, policy = fault_lab, unique("pr"), unique("keep-one")
    assert install(lab.rt, lab.celery_app, name).state == SUCCEEDED
    backed_up(lab, name)
    kept = backed_up(lab, name)
    with transaction(lab.rt.sessions) as session:
        store_id = session.scalar(select(BackupStore.id).where(BackupStore.name == local_store))
        session.add(BackupPolicy(name=policy, selector={"vms": [name]}, schedule="0 3 * * *", store_id=store_id,
                                 retention={"keep_last": 1}, enabled=False))
    lab.crash_worker_at("prune-backups", phase)
    job_id = start(lab, "prune-backups", {"policy": policy})
    lab.wait_for_the_crash(job_id, f"prune-backups/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    assert job.state == SUCCEEDED, job.error_message
    with lab.rt.sessions() as session:
        assert set(session.scalars(select(Backup.id).where(Backup.vm_name == name))) == {kept}
    verified = run_job(lab.rt, lab.celery_app, "verify-backup", {"backup": kept})
    assert verified.state == SUCCEEDED, verified.error_message
    lab.assert_clean()
    lab.record(f"worker killed -9 at prune-backups / {phase}", job, seconds, "re-run; kept backup verifies; check clean")


@pytest.mark.parametrize("mode, phase", [("full", "read manifest"), ("full", "write"), ("diff", "write")])
def test_restore_survives_a_crash(fault_lab: FaultLab, local_store: str, mode: str, phase: str):
    lab, name = fault_lab, unique("rs")
    assert install(lab.rt, lab.celery_app, name).state == SUCCEEDED
    backup_id = backed_up(lab, name)
    if mode == "diff":
        backup_id = backed_up(lab, name, "diff")
    lab.crash_worker_at("restore", phase)
    job_id = start(lab, "restore", {"backup": backup_id, "in_place": False})
    lab.wait_for_the_crash(job_id, f"restore/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    assert job.state == SUCCEEDED, job.error_message
    lab.assert_clean()
    lab.record(f"worker killed -9 at restore / {phase} (a {mode} backup, to a new volume)", job, seconds,
               "re-run; check clean")


def fenced(lab: FaultLab, server: str) -> bool:
    with lab.rt.sessions() as session:
        return session.scalar(select(ClusterServer.fenced_at).where(ClusterServer.name == server)) is not None


@pytest.mark.parametrize("kind, phase", [
    ("fence-server", "fence at the SAN"),              # marked fenced, tgtd not yet told
    ("remove-stale-domains", "remove stale domains"),  # activate's node child
    ("activate-server", "restore exports"),            # re-admitted, ACLs not yet restored
])
def test_fence_and_activate_survive_a_crash(fault_lab: FaultLab, kind: str, phase: str):
    lab, fencing = fault_lab, kind == "fence-server"
    if not fencing:
        assert run_job(lab.rt, lab.celery_app, "fence-server", {"server": "cs2"}).state == SUCCEEDED
    lab.crash_worker_at(kind, phase)
    job_id = start(lab, "fence-server" if fencing else "activate-server", {"server": "cs2"})
    lab.wait_for_the_crash(job_id, f"{kind}/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    assert job.state == SUCCEEDED, job.error_message
    assert fenced(lab, "cs2") is fencing
    lab.assert_clean()
    if fencing:
        assert run_job(lab.rt, lab.celery_app, "activate-server", {"server": "cs2"}).state == SUCCEEDED
        lab.assert_clean()
    lab.record(f"worker killed -9 at {kind} / {phase}", job, seconds,
               f"re-run; cs2 {'fenced' if fencing else 're-admitted'}; check clean")


@pytest.mark.parametrize("kind, phase, end", [
    ("rescue", "boot the rescue system", False),  # the control workflow, starting its node child
    ("rescue-domain", "start", False),            # the node, the rescue domain defined, not started
    ("rescue-domain", "define", True),            # the node, the rescue system stopped, the VM's own not defined
])
def test_rescue_survives_a_crash(fault_lab: FaultLab, kind: str, phase: str, end: bool):
    lab, name = fault_lab, unique("rsq")
    assert install(lab.rt, lab.celery_app, name, server="cs1").state == SUCCEEDED
    assert run_job(lab.rt, lab.celery_app, "destroy", {"vm": name}).state == SUCCEEDED
    if end:
        assert run_job(lab.rt, lab.celery_app, "rescue", {"vm": name}).state == SUCCEEDED
    lab.crash_worker_at(kind, phase)
    job_id = start(lab, "rescue", {"vm": name, "end": end})
    lab.wait_for_the_crash(job_id, f"{kind}/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    assert job.state == SUCCEEDED, job.error_message
    assert lab.vm_state(name) == ("shut off" if end else "rescue")
    if not end:
        console_answer(server_uri(lab.rt, "cs1"), name, 'echo RES""CUED-$(grep -c laxcluster.rescue /proc/cmdline)',
                       "RESCUED-1")
    lab.assert_clean()
    if not end:
        assert run_job(lab.rt, lab.celery_app, "rescue", {"vm": name, "end": True}).state == SUCCEEDED
    assert run_job(lab.rt, lab.celery_app, "start", {"vm": name}).state == SUCCEEDED
    works = assert_vm_works(lab, name)
    lab.assert_clean()
    lab.record(f"worker killed -9 at {kind} / {phase} (rescue{' --end' if end else ''})", job, seconds,
               f"re-run; {'its own domain back' if end else 'the rescue system runs'}; check clean; {works}")


@pytest.mark.parametrize("kind, phase, stop", [
    ("start", "start on the SAN host", False),  # the control workflow, starting its SAN child
    ("start-on-san", "define", False),          # the SAN, the VM's exports locked, its domain not yet defined
    ("start-on-san", "start", False),           # the SAN, the domain defined on its host, not started
    ("power-on-san", "end maintenance", True),  # the SAN, the domain there stopped, still defined, exports locked
])
def test_a_start_on_the_san_host_survives_a_crash(fault_lab: FaultLab, kind: str, phase: str, stop: bool):
    lab, name = fault_lab, unique("osn")
    san_host = lab.rt.config.san("san-a")[1].uri
    assert install(lab.rt, lab.celery_app, name, server="cs1").state == SUCCEEDED
    assert run_job(lab.rt, lab.celery_app, "destroy", {"vm": name}).state == SUCCEEDED
    if stop:
        assert run_job(lab.rt, lab.celery_app, "start", {"vm": name, "on_san": True}).state == SUCCEEDED
    lab.crash_worker_at(kind, phase)
    job_id = start(lab, "destroy", {"vm": name}) if stop else start(lab, "start", {"vm": name, "on_san": True})
    lab.wait_for_the_crash(job_id, f"{kind}/{phase}")
    job, seconds = lab.final(job_id, lab.restart_worker())
    assert job.state == SUCCEEDED, job.error_message
    assert lab.vm_state(name) == ("shut off" if stop else "maintenance")
    if not stop:
        assert boot_line(san_host, name)[0] == name
    lab.assert_clean()
    if not stop:
        assert run_job(lab.rt, lab.celery_app, "destroy", {"vm": name}).state == SUCCEEDED
    assert run_job(lab.rt, lab.celery_app, "start", {"vm": name}).state == SUCCEEDED
    works = assert_vm_works(lab, name)
    lab.assert_clean()
    lab.record(f"worker killed -9 at {kind} / {phase} ({'destroy on' if stop else 'start --on'}-san)", job, seconds,
               f"re-run; {'maintenance ended' if stop else 'runs on the SAN host'}; check clean; {works}")
