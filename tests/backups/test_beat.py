"""Celery beat runs a policy made through the API: its due backup once, then pruning by its retention."""

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from api import create_app
from cli.tokens import create_token
from config import DEFAULTS
from lab.processes import wait_until
from models import SUCCEEDED, Job, utcnow
from models.db import transaction
from models.protection import Backup, BackupPolicy, BackupStore
from tasks.inventory.config_sync import sync_from_config
from tasks.queues import CONTROL, san_queue
from tests.fixtures import factories
from tests.fixtures.san import mounted_filesystem
from workers.san.backup import backup_volume
from workers.san.chunks import LocalStore
from workers.san.reflink import ReflinkBackend

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]
MiB = 1 << 20


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Path]:
    yield from mounted_filesystem("xfs", tmp_path)


@pytest.fixture
def lax_env(db_url: str, redis_port: int, tmp_path: Path, pool: Path) -> dict[str, str]:
    """The test's DB and Redis, san-a's pool on XFS and a scheduler ticking every second."""
    config = tmp_path / "laxcluster.toml"
    config.write_text(DEFAULTS.read_text().replace('pool_path = "var/lab/san-a/pool"', f'pool_path = "{pool}"'))
    return {"LAXCLUSTER_CONFIG": str(config), "LAXCLUSTER_BACKUPS_DISPATCH_EVERY_S": "1.0", "LAXCLUSTER_VAR_DIR": str(tmp_path / "var"),
            "LAXCLUSTER_DB_URL": db_url, "LAXCLUSTER_REDIS_PORT": str(redis_port),
            "LAXCLUSTER_REDIS_DB": str(int.from_bytes(os.urandom(1), "big") % 15 + 1),
            "LAXCLUSTER_JOBS_HEARTBEAT_TTL_S": "3", "LAXCLUSTER_JOBS_DB_WRITE_INTERVAL_S": "0.2"}


def test_beat_runs_a_due_policy_once_and_prunes_by_its_retention(rt, celery_app, celery_worker, pool: Path,
                                                                  tmp_path: Path) -> None:
    with transaction(rt.sessions) as session:
        sync_from_config(session, rt.config)
        factories.vm(session, "web", state="running", disk_bytes=64 * MiB)
        token = create_token(session, "admin", "beat-test")
    backend = ReflinkBackend(str(pool))
    backend.create("web-disk", 64 * MiB)
    with open(backend.path_for_export("web-disk"), "r+b") as disk:
        disk.write(os.urandom(4 * MiB))
    headers = {"Authorization": f"Bearer {token}"}
    api = create_app(rt, celery_app).test_client()
    store_dir = tmp_path / "store"
    assert api.post("/stores", json={"name": "local", "kind": "local", "location": str(store_dir)},
                    headers=headers).status_code == 201
    made = api.post("/policies", json={"name": "often", "vms": ["web"], "schedule": "0 0 1 1 *", "store": "local",
                                       "retention": {"keep_last": 1}}, headers=headers)
    assert made.status_code == 201, made.get_data(as_text=True)
    old = an_old_backup(rt, store_dir, tmp_path)
    # Due every 1 January, last run more than a year ago: one due moment, whatever the clock says
    # while the test runs, so every tick after the first must find nothing new.
    with transaction(rt.sessions) as session:
        session.scalar(select(BackupPolicy)).last_run_at = utcnow() - timedelta(days=400)

    celery_worker([CONTROL, san_queue("site-a")], beat=True)

    def pruned() -> bool:
        with rt.sessions() as session:
            return session.get(Backup, old) is None
    wait_until(pruned, 60, "beat to back up web and prune the older backup")
    with rt.sessions() as session:
        backups = session.scalars(select(Job).where(Job.kind == "snapshot-backup")).all()
        (kept,) = session.scalars(select(Backup)).all()
    assert [(j.state, j.requested_by, j.params["vm"]) for j in backups] == [(SUCCEEDED, "policy/often", "web")]
    assert kept.vm_name == "web" and kept.mode == "full"
    assert LocalStore(str(store_dir)).list_manifests() == [kept.id]


def an_old_backup(rt, store_dir: Path, tmp_path: Path) -> str:
    """A day-old backup of web in the store (its own manifest and chunks), which keep_last 1 lets go."""
    source = tmp_path / "old.img"
    source.write_bytes(os.urandom(MiB))
    with transaction(rt.sessions) as session:
        store_id = session.scalar(select(BackupStore.id))
        row = Backup(vm_name="web", volume_name="web-disk", san_name="san-a", store_id=store_id, mode="full",
                     state="complete", created_at=utcnow() - timedelta(days=1))
        session.add(row)
        session.flush()
        backup_volume(str(source), MiB, LocalStore(str(store_dir)), backup_id=row.id, chunk_size=256 * 1024)
        assert session.scalar(select(func.count()).select_from(Backup)) == 1
        return row.id
