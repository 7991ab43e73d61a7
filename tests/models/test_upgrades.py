"""Upgrades: an inventory made at the first revision, with rows in it, migrated up to head and back down on
SQLite and PostgreSQL, keeps its rows; at head the schema is the one the models declare."""

import uuid
from collections.abc import Iterator
from datetime import datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, create_engine, insert, select

from models import Backup, ClusterServer, Job, VirtualMachine, Volume
from models.base import Base
from models.db import MIGRATIONS, make_session_factory

FIRST = "0001"
NOW = datetime(2026, 1, 2, 3, 4, 5)
VM_UUID, JOB_ID, BACKUP_ID = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """An empty database, not migrated."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'inventory.db'}"
    else:
        yield request.getfixturevalue("fresh_postgres_url")


def alembic_config(url: str) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def fill_first_revision(engine: Engine) -> None:
    """One row of each kind an operator's inventory has, written with the first revision's columns."""
    meta = MetaData()
    meta.reflect(engine)
    t = meta.tables
    with engine.begin() as db:
        site = db.execute(insert(t["sites"]).values(name="site-a")).inserted_primary_key[0]
        san = db.execute(insert(t["sans"]).values(name="san-a", site_id=site, backend="xfs", pool_path="/srv/pool",
                                                  portal="10.0.0.1:3260", facts={}, created_at=NOW)).inserted_primary_key[0]
        cluster = db.execute(insert(t["clusters"]).values(name="c1", site_id=site)).inserted_primary_key[0]
        server = db.execute(insert(t["cluster_servers"]).values(
            name="cs1", cluster_id=cluster, libvirt_uri="qemu+tcp://10.0.0.2/system",
            initiator_iqn="iqn.2026-01.test:cs1", maintenance=False)).inserted_primary_key[0]
        template = db.execute(insert(t["templates"]).values(
            name="tiny", os="linux", default_size_bytes=1 << 27, customization="nocloud", san_id=san,
            backend_handle="templates/tiny", boot={}, created_at=NOW)).inserted_primary_key[0]
        vm = db.execute(insert(t["virtual_machines"]).values(
            name="web1", uuid=VM_UUID, description="kept", template_id=template, cluster_id=cluster,
            server_id=server, memory_bytes=1 << 28, vcpus=1, hypervisor="qemu", state="running",
            desired_state="running", ssh_keys=["ssh-ed25519 AAAA test"], tags=["web"], created_at=NOW)
        ).inserted_primary_key[0]
        volume = db.execute(insert(t["volumes"]).values(
            name="web1-disk", san_id=san, vm_id=vm, role="disk", size_bytes=1 << 28, backend_handle="vols/web1",
            iscsi_target="iqn.2026-01.test:web1", iscsi_lun=1, created_at=NOW)).inserted_primary_key[0]
        store = db.execute(insert(t["backup_stores"]).values(name="local", kind="local", location="/srv/backups",
                                                             credentials={})).inserted_primary_key[0]
        db.execute(insert(t["backups"]).values(
            id=BACKUP_ID, vm_id=vm, volume_id=volume, vm_name="web1", volume_name="web1-disk", san_name="san-a",
            store_id=store, mode="full", state="complete", chunks=2, size_bytes=1 << 28, stored_bytes=1 << 20,
            bytes_read=1 << 28, created_at=NOW))
        db.execute(insert(t["jobs"]).values(
            id=JOB_ID, kind="install-vm", target="vm/web1", params={"vm": "web1"}, queue="control",
            state="succeeded", progress=100.0, phase="done", result={"server": "cs1"}, requested_by="admin",
            cancel_requested=False, attempt=1, created_at=NOW, updated_at=NOW))


def first_revision_rows(engine: Engine) -> dict[str, tuple]:
    """The rows fill_first_revision wrote, read by the first revision's columns."""
    meta = MetaData()
    meta.reflect(engine)
    t = meta.tables
    with engine.connect() as db:
        return {
            "vm": db.execute(select(t["virtual_machines"].c["name", "description", "state", "ssh_keys", "tags"])).one(),
            "volume": db.execute(select(t["volumes"].c["name", "size_bytes", "iscsi_lun"])).one(),
            "backup": db.execute(select(t["backups"].c["id", "state", "stored_bytes"])).one(),
            "job": db.execute(select(t["jobs"].c["id", "kind", "result"])).one(),
            "server": db.execute(select(t["cluster_servers"].c["name", "initiator_iqn"])).one(),
        }


def test_an_inventory_of_the_first_revision_goes_up_to_head_and_back_with_its_rows(empty_db):
    alembic = alembic_config(empty_db)
    command.upgrade(alembic, FIRST)
    engine = create_engine(empty_db)
    try:
        fill_first_revision(engine)
        before = first_revision_rows(engine)

        command.upgrade(alembic, "head")
        with engine.connect() as db:
            assert compare_metadata(MigrationContext.configure(db), Base.metadata) == []
        with make_session_factory(engine)() as session:
            vm = session.scalar(select(VirtualMachine))
            assert (vm.name, vm.uuid, vm.ha, vm.ha_priority) == ("web1", VM_UUID, True, 0)
            assert session.scalar(select(Volume)).label is None
            assert session.scalar(select(Backup)).group_id is None
            server = session.scalar(select(ClusterServer))
            assert (server.fenced_at, server.hypervisor) == (None, None)
            job = session.get(Job, JOB_ID)
            assert (job.waiting, job.continuation, job.result) == (False, {}, {"server": "cs1"})
        engine.dispose()

        command.downgrade(alembic, FIRST)
        assert first_revision_rows(engine) == before
        engine.dispose()
        command.upgrade(alembic, "head")
        with engine.connect() as db:
            assert MigrationContext.configure(db).get_current_revision() == ScriptDirectory.from_config(alembic).get_current_head()
    finally:
        engine.dispose()
