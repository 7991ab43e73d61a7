"""Data disks on the lab, through the API: a disk hot-plugged into a running tiny VM is written from inside the
guest, read back after a live migration, backed up in one backup with the boot disk, overwritten, restored in place with it, read back by the
guest after a start (the domain carries it), and removed live with its LUN and volume; a data disk the VM still
has when it is deleted goes with it."""

import secrets
from pathlib import Path

import pytest
from sqlalchemy import select

from models import SUCCEEDED, ClusterServer, Job, VirtualMachine, Volume
from tasks.san.storage import target_for
from tasks.san.volumes import san_place
from tests.fixtures.vms import boot_line, console_answer, install, run_job, server_uri, unique, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.lab]
MiB = 1 << 20
READ_BACK = "dd if=/dev/vdc bs=512 count=1 2>/dev/null | head -c 32; echo"


def finished(rt, response) -> Job:
    assert response.status_code == 202, response.get_data(as_text=True)
    job = wait_job(rt, response.get_json()["id"])
    assert job.state == SUCCEEDED, job.error_message
    return job


def server_of(rt, name: str) -> str:
    with rt.sessions() as session:
        return session.scalar(select(ClusterServer.name).join(VirtualMachine).where(VirtualMachine.name == name))


def volume_path(rt, volume_id: int) -> Path:
    with rt.sessions() as session:
        handle = session.get(Volume, volume_id).backend_handle
    return Path(san_place(rt.config, "san-a").backend.path_for_export(handle))


def head(path: Path, size: int) -> bytes:
    with open(path, "rb") as disk:
        return disk.read(size)


def guest_writes(uri: str, name: str, dev: str, pattern: str) -> None:
    """The guest waits for the hot-plugged block device, then writes `pattern` at its start."""
    console_answer(uri, name, f"test -b /dev/{dev} && echo HAVE\"\"-{dev}", f"HAVE-{dev}")
    console_answer(uri, name, f"printf '%s' {pattern} | dd of=/dev/{dev} conv=fsync 2>/dev/null && echo WR\"\"OTE",
                   "WROTE", timeout=30)


@pytest.mark.postgres_too
def test_a_hot_plugged_disk_is_backed_up_and_restored_with_the_boot_disk(cluster, celery_app, api, tmp_path):
    rt = cluster
    name, pattern = unique("dsk"), f"LAXDISK-{secrets.token_hex(6)}-END"
    snapshots: list[str] = []
    try:
        assert install(rt, celery_app, name).state == SUCCEEDED
        uri = server_uri(rt, server_of(rt, name))
        added = finished(rt, api.post(f"/vms/{name}/disks", json={"size": "64M", "label": "data"}))
        assert (added.result["attached"], added.result["lun"]) == ("hot-plugged", 3)
        disk_id = added.result["disk"]
        listed = api.get(f"/vms/{name}/disks").get_json()["items"]
        assert [(d["role"], d["iscsi_lun"], d["label"]) for d in listed] == [("disk", 1, None), ("data", 3, "data")]

        guest_writes(uri, name, "vdc", pattern)
        assert head(volume_path(rt, disk_id), len(pattern)) == pattern.encode()
        to = "cs2" if server_of(rt, name) == "cs1" else "cs1"
        moved = run_job(rt, celery_app, "migrate", {"vm": name, "to": to})  # live: the data disk moves along
        assert moved.state == SUCCEEDED, moved.error_message
        uri = server_uri(rt, to)
        console_answer(uri, name, READ_BACK, pattern)

        assert api.post("/stores", json={"name": "local", "kind": "local",
                                         "location": str(tmp_path / "store")}).status_code == 201
        backed_up = finished(rt, api.post(f"/vms/{name}/backups", json={"mode": "full"}))
        rows = backed_up.result["backups"]
        assert sorted(row["volume_id"] for row in rows) == sorted(d["id"] for d in listed)
        listed_backups = api.get(f"/backups?vm={name}").get_json()["items"]
        assert {b["group"] for b in listed_backups} == {backed_up.id}
        snapshots += [b["snapshot"] for b in listed_backups]

        assert run_job(rt, celery_app, "destroy", {"vm": name}).state == SUCCEEDED
        with open(volume_path(rt, disk_id), "r+b") as disk:
            disk.write(b"\0" * MiB)
        restored = finished(rt, api.post(f"/backups/{rows[0]['id']}/actions/restore", json={"in_place": True}))
        assert len(restored.result["disks"]) == 2
        assert head(volume_path(rt, disk_id), len(pattern)) == pattern.encode()

        assert run_job(rt, celery_app, "start", {"vm": name}).state == SUCCEEDED
        assert boot_line(uri, name)[0] == name
        console_answer(uri, name, READ_BACK, pattern)

        path, iqn = volume_path(rt, disk_id), listed[1]["iscsi_target"]
        finished(rt, api.delete(f"/vms/{name}/disks/{disk_id}"))
        assert not path.exists()
        assert 3 not in target_for(rt.config.san("san-a")[1]).find(iqn).luns
        assert [d["role"] for d in api.get(f"/vms/{name}/disks").get_json()["items"]] == ["disk"]

        again = finished(rt, api.post(f"/vms/{name}/disks", json={"size": "64M"}))
        assert (again.result["attached"], again.result["lun"]) == ("hot-plugged", 3)
        kept = volume_path(rt, again.result["disk"])
        assert run_job(rt, celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED
        assert not kept.exists()  # deleting the VM deletes its data disks
    finally:
        for snap in snapshots:
            if snap:
                san_place(rt.config, "san-a").backend.delete_snapshot(snap)
