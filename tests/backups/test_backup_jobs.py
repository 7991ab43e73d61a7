"""The backup jobs run in-process (no Celery) on a real DB, a real Redis and a reflink pool on a real XFS."""

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import config
from config import DEFAULTS
from models import CANCELLED, FAILED, SUCCEEDED, Job, VirtualMachine, Volume
from models.db import transaction
from models.protection import Backup, BackupStore
import tasks.san.backups  # noqa: F401  (registers the backup job kinds)
from tasks import jobs
from tasks.dispatch import cancel_key
from tasks.inventory.config_sync import sync_from_config
from tasks.progress import channel
from tasks.runner import execute
from tasks.runtime import Runtime, make_runtime
from tasks.workflow import lookup
from tests.fixtures import factories
from tests.fixtures.sshd import run_sshd
from tests.fixtures.san import mounted_filesystem
from tests.support import damage_chunk, sha256_of, write_at
from workers.san.chunks import LocalStore
from workers.san.reflink import ReflinkBackend

MiB = 1024 * 1024
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Path]:
    yield from mounted_filesystem("xfs", tmp_path)


@pytest.fixture
def brt(pool: Path, db_url: str, redis_port: int, tmp_path: Path) -> Iterator[Runtime]:
    """A runtime whose san-a keeps its volumes on the XFS pool; san-a's inventory rows and one local store."""
    text = DEFAULTS.read_text().replace('pool_path = "var/lab/san-a/pool"', f'pool_path = "{pool}"')
    path = tmp_path / "laxcluster.toml"
    path.write_text(text)
    env = {"LAXCLUSTER_DB_URL": db_url, "LAXCLUSTER_REDIS_PORT": str(redis_port),
           "LAXCLUSTER_REDIS_DB": str(int.from_bytes(os.urandom(1), "big") % 15 + 1),
           "LAXCLUSTER_VAR_DIR": str(tmp_path / "var")}
    runtime = make_runtime(config.load(path, environ=env))
    with transaction(runtime.sessions) as session:
        sync_from_config(session, runtime.config)
        session.add(BackupStore(name="local", kind="local", location=str(tmp_path / "store"), credentials={}))
    yield runtime
    runtime.redis.flushdb()
    runtime.redis.close()
    runtime.engine.dispose()


@pytest.fixture
def vm_disk(brt: Runtime, pool: Path) -> Path:
    """VM `web` with a 64 MiB disk volume holding random, text and zero regions and holes."""
    with transaction(brt.sessions) as session:
        factories.vm(session, "web", state="running", disk_bytes=64 * MiB)
    backend = ReflinkBackend(str(pool))
    backend.create("web-disk", 64 * MiB)
    disk = Path(backend.path_for_export("web-disk"))
    write_at(disk, 0, os.urandom(6 * MiB))
    write_at(disk, 20 * MiB, b"a line of text\n" * (2 * MiB // 15))
    write_at(disk, 40 * MiB, bytes(MiB))
    return disk


def run(rt: Runtime, kind: str, target: str, params: dict[str, Any], before=None) -> Job:
    """Submit and claim a job, then run its workflow here as a worker would; return the finished row."""
    with transaction(rt.sessions) as session:
        job, _ = jobs.submit(session, kind=kind, target=target, queue="san.site-a", params=params)
    with transaction(rt.sessions) as session:
        claimed = jobs.claim(session, job.id, 0, "test")
    if before is not None:
        before(claimed.id)
    execute(rt, claimed, lookup(kind))
    with rt.sessions() as session:
        return session.get(Job, job.id)


def backups(rt: Runtime) -> list[Backup]:
    with rt.sessions() as session:
        return list(session.scalars(select(Backup).order_by(Backup.created_at)))


def snapshots(pool: Path) -> list[str]:
    return sorted(p.name for p in pool.glob("web-disk@*.snap"))


def test_full_then_differential_then_restore_and_verify(brt: Runtime, pool: Path, vm_disk: Path,
                                                        tmp_path: Path) -> None:
    full = run(brt, "snapshot-backup", "backup/web", {"vm": "web", "mode": "full", "store": "local"})
    assert full.state == SUCCEEDED, full.error_message
    first_anchor = snapshots(pool)
    assert len(first_anchor) == 1

    write_at(vm_disk, 3 * MiB, os.urandom(MiB))
    diff = run(brt, "snapshot-backup", "backup/web", {"vm": "web", "mode": "diff", "store": "local"})
    assert diff.state == SUCCEEDED, diff.error_message
    first, second = backups(brt)
    assert (first.mode, second.mode, second.parent_id) == ("full", "diff", first.id)
    assert (second.vm_name, second.volume_name, second.san_name, second.state) == ("web", "web-disk", "san-a", "complete")
    assert 0 < second.bytes_read <= 2 * 4 * MiB < first.bytes_read
    anchors = snapshots(pool)
    assert len(anchors) == 1 and anchors != first_anchor  # the older anchor is gone, the newer kept
    assert diff.result["backups"][0]["id"] == second.id

    restored = run(brt, "restore", "restore/web", {"backup": second.id, "as": "web-copy"})
    assert restored.state == SUCCEEDED, restored.error_message
    assert sha256_of(pool / "web-copy.img") == sha256_of(pool / anchors[0])
    with brt.sessions() as session:
        copy = session.scalar(select(Volume).where(Volume.name == "web-copy"))
        assert (copy.role, copy.size_bytes, copy.vm_id) == ("disk", 64 * MiB, None)

    verified = run(brt, "verify-backup", f"backup-verify/{second.id}", {"backup": second.id})
    assert verified.state == SUCCEEDED, verified.error_message
    assert backups(brt)[1].state == "verified" and backups(brt)[1].verified_at is not None

    store = LocalStore(str(tmp_path / "store"))
    digest = next(c["digest"] for c in store.get_manifest(second.id)["chunks"] if "digest" in c)
    damage_chunk(store.path, store, digest, 10, b"bitrot")
    broken = run(brt, "verify-backup", f"backup-verify/{second.id}", {"backup": second.id})
    assert (broken.state, broken.error_code) == (FAILED, "BackupCorrupt")
    assert digest in broken.error_message
    after = backups(brt)[1]
    assert after.state == "corrupt" and digest in after.error


def test_a_differential_without_an_anchor_is_a_full(brt: Runtime, vm_disk: Path) -> None:
    job = run(brt, "snapshot-backup", "backup/web", {"vm": "web", "mode": "diff", "store": "local"})
    assert job.state == SUCCEEDED, job.error_message
    (only,) = backups(brt)
    assert (only.mode, only.parent_id) == ("full", None)


def test_cancel_mid_backup_leaves_no_backup_and_no_snapshot(brt: Runtime, pool: Path, vm_disk: Path,
                                                            tmp_path: Path) -> None:
    def cancel_on_first_bytes(job_id: str) -> None:
        events = brt.redis.pubsub()
        events.subscribe(channel(job_id))

        def watch() -> None:
            for message in events.listen():
                if message["type"] == "message" and (json.loads(message["data"]).get("bytes_done") or 0) > 0:
                    brt.redis.set(cancel_key(job_id), 1)
                    events.close()
                    return

        threading.Thread(target=watch, daemon=True).start()

    job = run(brt, "snapshot-backup", "backup/web", {"vm": "web", "mode": "full", "store": "local"},
              before=cancel_on_first_bytes)

    assert job.state == CANCELLED
    assert backups(brt) == [] and snapshots(pool) == []
    assert LocalStore(str(tmp_path / "store")).list_manifests() == []


def disk_file(rt: Runtime, pool: Path, vm: str = "web") -> Path:
    """The file of the VM's disk volume, as its row names it now."""
    with rt.sessions() as session:
        handle = session.scalar(select(Volume.backend_handle).join(VirtualMachine)
                                .where(VirtualMachine.name == vm, Volume.role == "disk"))
    return pool / f"{handle}.img"


def stop(rt: Runtime, vm: str = "web") -> None:
    with transaction(rt.sessions) as session:
        session.scalar(select(VirtualMachine).where(VirtualMachine.name == vm)).state = "shut off"


def test_restore_in_place_needs_a_stopped_vm(brt: Runtime, pool: Path, vm_disk: Path, tmp_path: Path) -> None:
    run(brt, "snapshot-backup", "backup/web", {"vm": "web", "store": "local"})
    (backup,) = backups(brt)
    snap = pool / snapshots(pool)[0]
    refused = run(brt, "restore", "vm/web", {"backup": backup.id, "in_place": True})
    assert (refused.state, refused.error_code) == (FAILED, "VmNotStopped")

    stop(brt)
    write_at(vm_disk, 0, os.urandom(2 * MiB))
    restored = run(brt, "restore", "vm/web", {"backup": backup.id, "in_place": True})
    assert restored.state == SUCCEEDED, restored.error_message
    assert sha256_of(disk_file(brt, pool)) == sha256_of(snap)
    assert not vm_disk.exists()  # the replaced volume is gone, nothing else is left beside

    # The next backups of the restored disk work as before: a differential restores bit for bit.
    write_at(disk_file(brt, pool), 50 * MiB, os.urandom(MiB))
    run(brt, "snapshot-backup", "backup/web", {"vm": "web", "mode": "full", "store": "local"})
    write_at(disk_file(brt, pool), 10 * MiB, os.urandom(MiB))
    diff = run(brt, "snapshot-backup", "backup/web", {"vm": "web", "mode": "diff", "store": "local"})
    assert (diff.state, backups(brt)[-1].mode) == (SUCCEEDED, "diff"), diff.error_message
    copy = run(brt, "restore", "restore/web", {"backup": backups(brt)[-1].id, "as": "web-copy"})
    assert copy.state == SUCCEEDED, copy.error_message
    assert sha256_of(pool / "web-copy.img") == sha256_of(disk_file(brt, pool))


def test_an_in_place_restore_missing_a_chunk_leaves_the_disk_as_it_was(brt: Runtime, pool: Path, vm_disk: Path,
                                                                       tmp_path: Path) -> None:
    run(brt, "snapshot-backup", "backup/web", {"vm": "web", "store": "local"})
    (backup,) = backups(brt)
    stop(brt)
    write_at(vm_disk, 0, os.urandom(8 * MiB))
    before, files = sha256_of(vm_disk), sorted(pool.iterdir())
    store = LocalStore(str(tmp_path / "store"))
    lost = [c for c in store.get_manifest(backup.id)["chunks"] if "digest" in c][-1]
    store.delete_chunk(lost["digest"])

    job = run(brt, "restore", "vm/web", {"backup": backup.id, "in_place": True})

    assert (job.state, job.error_code) == (FAILED, "ChunkMissing")
    assert lost["digest"] in job.error_message
    assert sha256_of(disk_file(brt, pool)) == before and disk_file(brt, pool) == vm_disk
    assert sorted(pool.iterdir()) == files


def test_a_cancelled_in_place_restore_leaves_the_disk_as_it_was(brt: Runtime, pool: Path, vm_disk: Path) -> None:
    write_at(vm_disk, 0, os.urandom(64 * MiB))  # every chunk stored, so the write phase takes a while
    run(brt, "snapshot-backup", "backup/web", {"vm": "web", "store": "local"})
    (backup,) = backups(brt)
    stop(brt)
    write_at(vm_disk, 0, os.urandom(MiB))
    before, files = sha256_of(vm_disk), sorted(pool.iterdir())

    def cancel_when_writing(job_id: str) -> None:
        events = brt.redis.pubsub()
        events.subscribe(channel(job_id))

        def watch() -> None:
            for message in events.listen():
                if message["type"] == "message" and json.loads(message["data"]).get("phase") == "write":
                    brt.redis.set(cancel_key(job_id), 1)
                    events.close()
                    return

        threading.Thread(target=watch, daemon=True).start()

    job = run(brt, "restore", "vm/web", {"backup": backup.id, "in_place": True}, before=cancel_when_writing)

    assert job.state == CANCELLED
    assert sha256_of(disk_file(brt, pool)) == before and disk_file(brt, pool) == vm_disk
    assert sorted(pool.iterdir()) == files


def test_backups_to_an_ssh_store_restore_bit_exact(brt: Runtime, pool: Path, vm_disk: Path, tmp_path: Path) -> None:
    with run_sshd(tmp_path / "sshd") as sshd:
        with transaction(brt.sessions) as session:
            session.add(BackupStore(name="remote", kind="ssh", location=f"root@127.0.0.1:{tmp_path / 'remote'}",
                                    credentials={"private_key": sshd.private_key, "host_key": sshd.host_key_line,
                                                 "port": str(sshd.port)}))
        full = run(brt, "snapshot-backup", "backup/web", {"vm": "web", "mode": "full", "store": "remote"})
        write_at(vm_disk, 30 * MiB, os.urandom(MiB))
        diff = run(brt, "snapshot-backup", "backup/web", {"vm": "web", "mode": "diff", "store": "remote"})
        assert (full.state, diff.state) == (SUCCEEDED, SUCCEEDED), (full.error_message, diff.error_message)
        newest = backups(brt)[-1]
        assert newest.mode == "diff" and (tmp_path / "remote" / "manifests" / f"{newest.id}.json").exists()
        restored = run(brt, "restore", "restore/web", {"backup": newest.id, "as": "web-remote"})
        assert restored.state == SUCCEEDED, restored.error_message
        assert sha256_of(pool / "web-remote.img") == sha256_of(pool / snapshots(pool)[0])


def test_a_backup_waits_while_its_store_is_pruned(brt: Runtime, vm_disk: Path) -> None:
    with transaction(brt.sessions) as session:
        prune, _ = jobs.submit(session, kind="prune-backups", target="prune/local", queue="san.site-a",
                               params={"policy": "p"})
    waiting = run(brt, "snapshot-backup", "backup/web", {"vm": "web", "store": "local"})
    # It waits without holding its worker: the run ends, the job stays running and waits for the prune.
    assert (waiting.state, waiting.waiting, waiting.phase) == ("running", True, f"wait for prune job {prune.id}")
    assert waiting.continuation["wait"]["ids"] == [prune.id]
    assert backups(brt) == []

    with transaction(brt.sessions) as session:
        jobs.finish(session, jobs.get(session, prune.id), SUCCEEDED)
    with transaction(brt.sessions) as session:
        resumed = jobs.claim_resume(session, waiting.id, waiting.attempt, "test")
    execute(brt, resumed, lookup("snapshot-backup"))
    with brt.sessions() as session:
        finished = session.get(Job, waiting.id)
    assert finished.state == SUCCEEDED, finished.error_message
    assert len(backups(brt)) == 1