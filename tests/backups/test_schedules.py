"""The backup scheduler's ticks and pruning, run in-process on a real DB and Redis (no Celery worker)."""

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from models import SUCCEEDED, Job
from models.db import transaction
from models.protection import Backup, BackupPolicy, BackupStore
from tasks import jobs
from tasks.inventory.config_sync import sync_from_config
from tasks.progress import log_key
from tasks.runner import execute
from tasks.control.schedules import dispatch_due
from tasks.san import prune  # noqa: F401 (registers prune-backups)
from tasks.workflow import lookup
from tests.fixtures import factories
from workers.san.backup import backup_volume
from workers.san.chunks import LocalStore

MiB = 1 << 20


@pytest.fixture
def inventory(rt, tmp_path: Path):
    """Two VMs with disks on san-a, a local store and a nightly policy with a weekly full."""
    with transaction(rt.sessions) as session:
        sync_from_config(session, rt.config)
        factories.vm(session, "web", state="running", disk_bytes=64 * MiB)
        factories.vm(session, "db", state="running", disk_bytes=64 * MiB, tags=["nightly"])
        factories.vm(session, "other", state="running", disk_bytes=64 * MiB)
        store = BackupStore(name="local", kind="local", location=str(tmp_path / "store"), credentials={})
        session.add(store)
        session.flush()
        session.add(BackupPolicy(name="nightly", selector={"vms": ["web"], "tag": "nightly"}, schedule="0 3 * * *",
                                 modes={"mode": "diff", "full_schedule": "0 3 * * 0"}, store_id=store.id,
                                 retention={"keep_last": 2}, enabled=True))
    return rt


def backup_jobs(rt) -> list[Job]:
    with rt.sessions() as session:
        return list(session.scalars(select(Job).where(Job.kind == "snapshot-backup").order_by(Job.created_at)))


def finish_all(rt) -> None:
    with transaction(rt.sessions) as session:
        for job in session.scalars(select(Job).where(Job.state != SUCCEEDED)):
            jobs.finish(session, job, SUCCEEDED)


def test_a_due_backup_is_enqueued_once_however_many_ticks(inventory, celery_app):
    rt = inventory
    saturday = datetime(2026, 11, 28, 2, 0)
    assert dispatch_due(rt, celery_app, saturday) == {"backups": [], "prunes": []}  # first seen: from now on

    first = dispatch_due(rt, celery_app, saturday + timedelta(hours=1, seconds=10))
    second = dispatch_due(rt, celery_app, saturday + timedelta(hours=1, seconds=30))
    assert len(first["backups"]) == 2 and second == {"backups": [], "prunes": []}
    made = backup_jobs(rt)
    assert sorted((j.params["vm"], j.params["mode"], j.target, j.queue) for j in made) == [
        ("db", "diff", "backup/db", "san.site-a"), ("web", "diff", "backup/web", "san.site-a")]
    assert all(j.requested_by == "policy/nightly" and j.params["store"] == "local" for j in made)

    sunday = saturday + timedelta(days=1, hours=1, minutes=5)
    assert dispatch_due(rt, celery_app, sunday)["backups"] == []  # yesterday's are still running
    finish_all(rt)
    assert dispatch_due(rt, celery_app, sunday + timedelta(days=1))["backups"] != []
    monday = backup_jobs(rt)[-2:]
    assert {j.params["mode"] for j in monday} == {"diff"}


def test_the_full_schedule_makes_the_sunday_run_full(inventory, celery_app):
    rt = inventory
    dispatch_due(rt, celery_app, datetime(2026, 11, 29, 1, 0))
    dispatch_due(rt, celery_app, datetime(2026, 11, 29, 3, 0, 20))
    assert {j.params["mode"] for j in backup_jobs(rt)} == {"full"}


def test_a_disabled_or_edited_policy_is_followed_without_restart(inventory, celery_app):
    rt = inventory
    dispatch_due(rt, celery_app, datetime(2026, 11, 28, 1, 0))
    with transaction(rt.sessions) as session:
        session.scalar(select(BackupPolicy)).schedule = "30 1 * * *"
    assert len(dispatch_due(rt, celery_app, datetime(2026, 11, 28, 1, 31))["backups"]) == 2
    finish_all(rt)
    with transaction(rt.sessions) as session:
        session.scalar(select(BackupPolicy)).enabled = False
    assert dispatch_due(rt, celery_app, datetime(2026, 11, 29, 1, 31))["backups"] == []


def add_backup(rt, store: LocalStore, vm: str, when: datetime, parent: str | None = None) -> str:
    """A real manifest in the store (two random chunks, one shared by every backup) and its row."""
    source = Path(store.path).parent / f"{vm}-{when:%d%H}.img"
    source.write_bytes(b"\1" * 256 * 1024 + os.urandom(256 * 1024))
    with transaction(rt.sessions) as session:
        store_id = session.scalar(select(BackupStore.id))
        row = Backup(vm_name=vm, volume_name=f"{vm}-disk", san_name="san-a", store_id=store_id,
                     mode="diff" if parent else "full", parent_id=parent, state="complete", created_at=when)
        session.add(row)
        session.flush()
        backup_volume(str(source), 512 * 1024, store, backup_id=row.id, chunk_size=256 * 1024)
        return row.id


def test_pruning_keeps_retention_and_needed_parents_then_collects_garbage(inventory, celery_app, tmp_path: Path):
    rt = inventory
    store = LocalStore(str(tmp_path / "store"))
    day = datetime(2026, 11, 20, 3)
    full_1 = add_backup(rt, store, "web", day)
    diff_1 = add_backup(rt, store, "web", day + timedelta(days=1), parent=full_1)
    diff_2 = add_backup(rt, store, "web", day + timedelta(days=2), parent=diff_1)
    full_2 = add_backup(rt, store, "web", day + timedelta(days=3))
    diff_3 = add_backup(rt, store, "web", day + timedelta(days=4), parent=full_2)
    other = add_backup(rt, store, "other", day)  # no policy's: never pruned
    with transaction(rt.sessions) as session:
        policy = session.scalar(select(BackupPolicy))
        policy.last_run_at, policy.retention = day + timedelta(days=5), {"keep_last": 1}  # diff_3 needs full_2

    made = dispatch_due(rt, celery_app, day + timedelta(days=5, minutes=1))
    assert len(made["prunes"]) == 1
    with transaction(rt.sessions) as session:
        prune = jobs.claim(session, made["prunes"][0], 0, "test")
    execute(rt, prune, lookup("prune-backups"))

    with rt.sessions() as session:
        job = session.get(Job, prune.id)
        left = set(session.scalars(select(Backup.id)))
    assert job.state == SUCCEEDED, job.error_message
    assert left == {full_2, diff_3, other}
    assert sorted(job.result["deleted"]) == sorted([full_1, diff_1, diff_2])
    assert set(store.list_manifests()) == left
    referenced = {c["digest"] for i in left for c in store.get_manifest(i)["chunks"] if "digest" in c}
    assert set(store.list_chunks()) == referenced
    assert job.result["garbage"]["chunks_deleted"] == 3
    # full_1's pack was mostly dead: the shared chunk moved out of it, and the job said how far that got.
    events = [json.loads(event) for event in rt.redis.lrange(log_key(prune.id), 0, -1)]
    moving = [event for event in events if event["phase"] == "collect garbage" and event["bytes_total"]]
    assert job.result["garbage"]["packs_written"] == 1
    assert moving and moving[-1]["bytes_done"] == moving[-1]["bytes_total"] > 0
    assert dispatch_due(rt, celery_app, day + timedelta(days=5, minutes=2))["prunes"] == []
