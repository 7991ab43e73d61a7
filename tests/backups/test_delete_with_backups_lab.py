"""Deleting a VM removes its backup anchor snapshots from the SAN (its backups stay in their store), does
not race a backup of the VM, and a backup refuses a VM being deleted."""

import pytest
from sqlalchemy import select, update

from lab.processes import wait_until
from models import FAILED, SUCCEEDED, Job, VirtualMachine
from models.db import transaction
from models.protection import Backup, BackupStore
from tasks import submission
from tasks.san.volumes import san_place
from tests.fixtures.vms import install, run_job, san_objects, unique, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.lab]
TESTER = submission.Requester("test")
SNAPSHOT_PROGRESS = 2  # the backup's progress at its phase "snapshot"


def progress_of(rt, job_id: str) -> float:
    with rt.sessions() as session:
        return session.get(Job, job_id).progress


@pytest.fixture
def store(cluster, tmp_path) -> str:
    with transaction(cluster.sessions) as session:
        session.add(BackupStore(name="local", kind="local", location=str(tmp_path / "store")))
    return "local"


@pytest.mark.postgres_too
def test_deleting_a_vm_drops_its_anchors_after_its_running_backup(cluster, celery_app, store):
    rt = cluster
    name, before = unique("anchor"), san_objects(rt)
    assert install(rt, celery_app, name).state == SUCCEEDED
    full = run_job(rt, celery_app, "snapshot-backup", {"vm": name, "mode": "full"})
    assert full.state == SUCCEEDED, full.error_message
    backend = san_place(rt.config, "san-a").backend
    with rt.sessions() as session:
        anchor = session.scalar(select(Backup.snapshot).where(Backup.vm_name == name))
    assert backend.exists(anchor)

    diff = submission.start(rt, celery_app, "snapshot-backup", {"vm": name, "mode": "diff"}, TESTER)
    # Running past its check of the VM: a delete marked before that would (rightly) make the backup refuse.
    wait_until(lambda: progress_of(rt, diff.id) >= SNAPSHOT_PROGRESS, 120, "the differential backup to snapshot")
    deleted = wait_job(rt, submission.start(rt, celery_app, "delete-vm", {"vm": name}, TESTER).id)
    diff = wait_job(rt, diff.id)
    assert (diff.state, deleted.state) == (SUCCEEDED, SUCCEEDED), (diff.error_message, deleted.error_message)
    with rt.sessions() as session:
        removal = session.scalar(select(Job).where(Job.parent_id == deleted.id, Job.kind == "remove-vm-disks"))
    assert removal.started_at >= diff.finished_at  # the disks went only once the backup had read them
    assert san_objects(rt) == before  # no volume, no target, no anchor snapshot of either backup
    with rt.sessions() as session:
        kept = session.scalars(select(Backup).where(Backup.vm_name == name)).all()
    assert len(kept) == 2 and all(b.snapshot is None and b.state == "complete" for b in kept)


def test_a_backup_refuses_a_vm_being_deleted(cluster, celery_app, store):
    rt = cluster
    name = unique("doomed")
    assert install(rt, celery_app, name).state == SUCCEEDED
    with transaction(rt.sessions) as session:
        session.execute(update(VirtualMachine).where(VirtualMachine.name == name).values(desired_state="deleted"))
    refused = run_job(rt, celery_app, "snapshot-backup", {"vm": name, "mode": "full"})
    assert (refused.state, refused.error_code) == (FAILED, "VmBeingDeleted")
    assert run_job(rt, celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED
