"""Backups on the lab, through the API: a running VM backed up full, stopped and started, then differential;
the differential restores bit for bit and verify finds a chunk the test corrupted. A backup to the ssh store
on the lab's backup host bk1, full then differential across a restart, restores the differential in
place onto a wrecked disk, and the VM boots again."""

import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from lab.topology import lab_dir
from models import SUCCEEDED, ClusterServer, Job, VirtualMachine
from tasks.san.volumes import san_place
from tests.support import damage_chunk, sha256_of
from tests.fixtures.vms import boot_line, disk_handle, domain_named, install, run_job, server_uri, unique, wait_job
from workers.san.chunks import LocalStore

pytestmark = [pytest.mark.integration, pytest.mark.lab]
MiB = 1 << 20




def finished(rt, response) -> Job:
    assert response.status_code == 202, response.get_data(as_text=True)
    return wait_job(rt, response.get_json()["id"])


def power(rt, celery_app, verb: str, name: str) -> None:
    job = run_job(rt, celery_app, verb, {"vm": name})
    assert job.state == SUCCEEDED, job.error_message


@pytest.mark.postgres_too
def test_full_then_differential_across_a_restart_restores_bit_exact(cluster, celery_app, api, tmp_path: Path):
    rt = cluster
    name = unique("bk")
    backend = san_place(rt.config, "san-a").backend
    made: list[str] = []
    try:
        assert install(rt, celery_app, name).state == SUCCEEDED
        assert api.post("/stores", json={"name": "local", "kind": "local",
                                         "location": str(tmp_path / "store")}).status_code == 201
        full = finished(rt, api.post(f"/vms/{name}/backups", json={"mode": "full"}))
        assert full.state == SUCCEEDED, full.error_message
        assert _vm_state(rt, name) == "running"

        power(rt, celery_app, "destroy", name)
        with open(backend.path_for_export(disk_handle(rt, name)), "r+b") as disk:  # what the guest might have written
            disk.seek(100 * MiB)
            disk.write(os.urandom(MiB))
        power(rt, celery_app, "start", name)
        diff = finished(rt, api.post(f"/vms/{name}/backups", json={"mode": "diff"}))
        assert diff.state == SUCCEEDED, diff.error_message

        listed = api.get(f"/backups?vm={name}").get_json()["items"]
        assert [b["mode"] for b in listed] == ["diff", "full"]
        newest, oldest = listed
        assert newest["parent"] == oldest["id"] and newest["size_bytes"] == oldest["size_bytes"] == 128 * MiB
        assert 0 < newest["bytes_read"] <= 2 * 4 * MiB and newest["bytes_read"] < oldest["bytes_read"]
        made.append(newest["snapshot"])

        copy = f"{name}-copy"
        made.append(copy)
        restore = finished(rt, api.post(f"/backups/{newest['id']}/actions/restore", json={"as": copy}))
        assert restore.state == SUCCEEDED, restore.error_message
        assert sha256_of(backend.path_for_export(copy)) == sha256_of(backend.path_for_export(newest["snapshot"]))

        twin = f"{name}-twin"
        accepted = api.post(f"/backups/{newest['id']}/actions/restore", json={"as_vm": twin})
        assert accepted.status_code == 202, accepted.get_json()
        as_vm = finished(rt, accepted)
        assert as_vm.state == SUCCEEDED, as_vm.error_message
        shown_twin = api.get(f"/vms/{twin}").get_json()
        assert shown_twin["state"] == "running" and shown_twin["ip"] != api.get(f"/vms/{name}").get_json()["ip"]
        # The restored root disk boots and configures itself from the twin's own seed: its name, its lease.
        assert boot_line(server_uri(rt, shown_twin["server"]), twin) == (twin, shown_twin["ip"])
        assert run_job(rt, celery_app, "delete-vm", {"vm": twin}).state == SUCCEEDED

        store = LocalStore(str(tmp_path / "store"))
        digest = next(c["digest"] for c in store.get_manifest(newest["id"])["chunks"] if "digest" in c)
        damage_chunk(store.path, store, digest, 8, b"corrupted")
        verify = finished(rt, api.post(f"/backups/{newest['id']}/actions/verify"))
        assert (verify.state, verify.error_code) == ("failed", "BackupCorrupt")
        shown = api.get(f"/backups/{newest['id']}").get_json()
        assert shown["state"] == "corrupt" and digest in shown["error"]

        # Backups outlive their VM under its name; deleting the VM must not trip over them.
        assert run_job(rt, celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED
        assert len(api.get(f"/backups?vm={name}").get_json()["items"]) == 2
    finally:
        for handle in made:
            if "@" in handle:
                backend.delete_snapshot(handle)
            else:
                backend.delete(handle)


def bk1_store(rt, name: str) -> tuple[dict, Path]:
    """An `ssh` store on the lab's backup host bk1 (its own directory there) and that directory."""
    host = next(h for h in rt.config.raw["backup_hosts"] if h["name"] == "bk1")
    address, directory = host["addresses"]["backup"], lab_dir(rt.config) / "bk1"
    key_type, key = (directory / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    credentials = {"private_key": (directory / "client_ed25519").read_text(), "host_key": f"{address} {key_type} {key}"}
    store = directory / "store" / name
    return {"name": "bk1", "kind": "ssh", "location": f"root@{address}:{store}", "credentials": credentials}, store


def test_a_differential_on_bk1_restores_in_place_and_the_vm_boots(cluster, celery_app, api):
    rt = cluster
    name = unique("bks")
    backend = san_place(rt.config, "san-a").backend
    body, store = bk1_store(rt, name)
    snapshots: list[str] = []
    try:
        assert install(rt, celery_app, name).state == SUCCEEDED
        made = api.post("/stores", json=body)
        assert made.status_code == 201 and "PRIVATE KEY" not in made.get_data(as_text=True)
        full = finished(rt, api.post(f"/vms/{name}/backups", json={"mode": "full", "store": "bk1"}))
        assert full.state == SUCCEEDED, full.error_message
        power(rt, celery_app, "destroy", name)
        power(rt, celery_app, "start", name)
        diff = finished(rt, api.post(f"/vms/{name}/backups", json={"mode": "diff", "store": "bk1"}))
        assert diff.state == SUCCEEDED, diff.error_message
        newest, oldest = api.get(f"/backups?vm={name}").get_json()["items"]
        assert (newest["mode"], newest["parent"], oldest["mode"]) == ("diff", oldest["id"], "full")
        snapshots += [newest["snapshot"], oldest["snapshot"]]
        assert (store / "manifests" / f"{newest['id']}.json").exists()

        power(rt, celery_app, "destroy", name)
        disk = backend.path_for_export(disk_handle(rt, name))
        with open(disk, "r+b") as wrecked:  # the disk is lost: its first 8 MiB overwritten
            wrecked.write(os.urandom(8 * MiB))
        restored = finished(rt, api.post(f"/backups/{newest['id']}/actions/restore", json={"in_place": True}))
        assert restored.state == SUCCEEDED, restored.error_message
        handle = disk_handle(rt, name)  # restored beside the wrecked disk, which it replaced
        assert not os.path.exists(disk)
        assert sha256_of(backend.path_for_export(handle)) == sha256_of(backend.path_for_export(newest["snapshot"]))
        power(rt, celery_app, "start", name)
        with rt.sessions() as session:
            server = session.scalar(select(ClusterServer.name).join(VirtualMachine).where(VirtualMachine.name == name))
        # tiny mounts this disk as its root filesystem: no boot line without a whole disk.
        assert boot_line(server_uri(rt, server), name)[0] == name
    finally:
        for snap in snapshots:
            backend.delete_snapshot(snap)
        shutil.rmtree(store, ignore_errors=True)


def _vm_state(rt, name: str) -> str:
    with rt.sessions() as session:
        return session.scalar(select(VirtualMachine.state).where(VirtualMachine.name == name))


@pytest.mark.postgres_too
def test_verify_with_boot_restores_a_scratch_vm_that_comes_up_and_goes(cluster, celery_app, api, tmp_path: Path):
    rt = cluster
    name = unique("bkv")
    backend = san_place(rt.config, "san-a").backend
    snapshots: list[str] = []
    try:
        assert install(rt, celery_app, name).state == SUCCEEDED
        assert api.post("/stores", json={"name": "local", "kind": "local",
                                         "location": str(tmp_path / "store")}).status_code == 201
        assert finished(rt, api.post(f"/vms/{name}/backups", json={"mode": "full"})).state == SUCCEEDED
        (backup,) = api.get(f"/backups?vm={name}").get_json()["items"]
        snapshots.append(backup["snapshot"])

        verified = finished(rt, api.post(f"/backups/{backup['id']}/actions/verify", json={"boot": True}))
        assert verified.state == SUCCEEDED, verified.error_message
        assert verified.result["came_up"] is True
        scratch = verified.result["vm"]
        assert verified.result["detail"].startswith(f"LAXCLUSTER-BOOT hostname={scratch} ")
        assert api.get(f"/backups/{backup['id']}").get_json()["state"] == "verified"
        assert api.get(f"/vms/{scratch}").status_code == 404
        for _, _, server in rt.config.servers():
            assert domain_named(server.uri, scratch) is None
        assert not list(Path(rt.config.san("san-a")[1].pool_path).glob(f"{scratch}-*"))
    finally:
        for snap in snapshots:
            backend.delete_snapshot(snap)
