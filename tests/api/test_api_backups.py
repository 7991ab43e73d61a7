"""Backups over HTTP: backing up, verifying and restoring as jobs on the SAN's queue; stores and policies."""

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from models.db import transaction
from models import VirtualMachine
from models.protection import Backup, BackupPolicy, BackupStore
from tests.fixtures import factories
from tests.fixtures.http import assert_problem, bearer

MIB = 1 << 20


def add_store(rt, name: str = "local", **fields) -> None:
    with transaction(rt.sessions) as session:
        session.add(BackupStore(name=name, kind=fields.get("kind", "local"), location=f"/srv/backups/{name}",
                                credentials=fields.get("credentials", {})))


def add_backup(rt, vm: str, minutes_ago: int, **fields) -> str:
    with transaction(rt.sessions) as session:
        store_id = session.scalar(select(BackupStore.id).limit(1))
        defaults = {"mode": "full", "state": "complete", "size_bytes": 64 * MIB, "stored_bytes": MIB,
                    "bytes_read": 8 * MIB, "chunks": 16}
        row = Backup(vm_name=vm, volume_name=f"{vm}-disk", san_name="san-a", store_id=store_id,
                     created_at=datetime(2026, 11, 25, 12) - timedelta(minutes=minutes_ago), **{**defaults, **fields})
        session.add(row)
        session.flush()
        return row.id


def test_stores_are_made_by_admins_and_never_show_credentials(rt, client, tokens):
    body = {"name": "bk1", "kind": "local", "location": "/srv/backups", "credentials": {"private_key": "SECRET"}}
    assert_problem(client.post("/stores", json=body, headers=bearer(tokens["operator"])), 403, "Forbidden")
    created = client.post("/stores", json=body, headers=bearer(tokens["admin"]))
    assert created.status_code == 201, created.get_data(as_text=True)
    listed = client.get("/stores", headers=bearer(tokens["viewer"]))
    assert listed.get_json()["items"] == [{"name": "bk1", "kind": "local", "location": "/srv/backups",
                                          "has_credentials": True}]
    assert "SECRET" not in created.get_data(as_text=True) + listed.get_data(as_text=True)
    assert_problem(client.post("/stores", json=body, headers=bearer(tokens["admin"])), 409, "StoreExists")


@pytest.mark.parametrize("changes, field", [
    ({"location": "relative/dir"}, "location"), ({"location": "/srv/../etc"}, "location"),
    ({"location": "/"}, "location"), ({"kind": "tape"}, "kind"), ({"name": "Bk"}, "name"),
    ({"credentials": {"key": 1}}, "credentials"), ({"colour": "red"}, "colour"),
])
def test_bad_stores_are_refused(rt, client, tokens, changes, field):
    body = {"name": "bk", "kind": "local", "location": "/srv/backups", **changes}
    problem = assert_problem(client.post("/stores", json=body, headers=bearer(tokens["admin"])), 422, "InvalidInput")
    assert problem["field"] == field


def test_a_backup_is_a_job_on_the_vms_san_queue(rt, client, tokens):
    add_store(rt)
    with transaction(rt.sessions) as session:
        factories.vm(session, "web", state="running", disk_bytes=64 * MIB)
    operator = bearer(tokens["operator"])
    response = client.post("/vms/web/backups", json={"mode": "diff"}, headers=operator)
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert (job["kind"], job["target"], job["queue"]) == ("snapshot-backup", "backup/web", "san.site-a")
    assert job["params"] == {"vm": "web", "mode": "diff", "store": "local"}
    busy = assert_problem(client.post("/vms/web/backups", json={}, headers=operator), 409, "TargetBusy")
    assert busy["job_id"] == job["id"]


def test_bad_backup_requests_are_refused(rt, client, tokens):
    with transaction(rt.sessions) as session:
        factories.vm(session, "web", disk_bytes=64 * MIB)
        factories.vm(session, "diskless")
    operator = bearer(tokens["operator"])
    assert_problem(client.post("/vms/web/backups", json={}, headers=operator), 422, "NoStoreChosen")
    add_store(rt, "one")
    add_store(rt, "two")
    assert_problem(client.post("/vms/web/backups", json={}, headers=operator), 422, "NoStoreChosen")
    assert_problem(client.post("/vms/web/backups", json={"store": "three"}, headers=operator), 422, "UnknownStore")
    assert assert_problem(client.post("/vms/web/backups", json={"mode": "incremental", "store": "one"},
                                      headers=operator), 422, "InvalidInput")["field"] == "mode"
    assert_problem(client.post("/vms/nobody/backups", json={"store": "one"}, headers=operator), 404, "VmNotFound")
    assert_problem(client.post("/vms/diskless/backups", json={"store": "one"}, headers=operator), 409, "NoDisks")
    assert_problem(client.post("/vms/web/backups", json={"store": "one"}, headers=bearer(tokens["viewer"])),
                   403, "Forbidden")


def test_backups_are_listed_newest_first_with_sizes_and_bytes_read(rt, client, tokens):
    add_store(rt)
    old = add_backup(rt, "web", minutes_ago=60)
    new = add_backup(rt, "web", minutes_ago=5, mode="diff", parent_id=old, bytes_read=MIB)
    add_backup(rt, "db", minutes_ago=1)
    viewer = bearer(tokens["viewer"])
    items = client.get("/backups?vm=web", headers=viewer).get_json()["items"]
    assert [(b["id"], b["mode"], b["parent"], b["bytes_read"]) for b in items] == [
        (new, "diff", old, MIB), (old, "full", None, 8 * MIB)]
    assert items[0]["store"] == "local" and items[0]["size_bytes"] == 64 * MIB and items[0]["stored_bytes"] == MIB
    assert len(client.get("/backups", headers=viewer).get_json()["items"]) == 3
    shown = client.get(f"/backups/{new}", headers=viewer).get_json()
    assert (shown["volume"], shown["san"], shown["state"]) == ("web-disk", "san-a", "complete")
    assert_problem(client.get("/backups/not-a-backup", headers=viewer), 404, "BackupNotFound")


def test_verify_and_restore_are_jobs_on_the_backups_san_queue(rt, client, tokens):
    add_store(rt)
    with transaction(rt.sessions) as session:
        factories.vm(session, "web", disk_bytes=64 * MIB)
    backup = add_backup(rt, "web", minutes_ago=1)
    operator = bearer(tokens["operator"])

    verify = client.post(f"/backups/{backup}/actions/verify", headers=operator).get_json()
    assert (verify["kind"], verify["queue"], verify["params"]) == ("verify-backup", "san.site-a", {"backup": backup})
    copy = client.post(f"/backups/{backup}/actions/restore", json={"as": "web-copy"}, headers=operator).get_json()
    assert (copy["kind"], copy["target"], copy["params"]) == (
        "restore", "restore/web-copy", {"backup": backup, "in_place": False, "as": "web-copy"})
    in_place = client.post(f"/backups/{backup}/actions/restore", json={"in_place": True}, headers=operator).get_json()
    assert (in_place["target"], in_place["params"]) == ("vm/web", {"backup": backup, "in_place": True})

    both = {"in_place": True, "as": "x"}
    assert_problem(client.post(f"/backups/{backup}/actions/restore", json=both, headers=operator), 422, "InvalidInput")
    taken = {"as": "web-disk"}
    assert_problem(client.post(f"/backups/{backup}/actions/restore", json=taken, headers=operator), 409, "Conflict")
    assert_problem(client.post("/backups/nope/actions/verify", headers=operator), 404, "BackupNotFound")


def test_policies_are_made_listed_and_changed(rt, client, tokens):
    add_store(rt)
    operator = bearer(tokens["operator"])
    body = {"name": "nightly", "vms": ["web", "db"], "schedule": "0 3 * * *", "mode": "diff",
            "full_schedule": "0 3 * * 0", "store": "local", "retention": {"keep_last": 3, "weekly": 4}}
    created = client.post("/policies", json=body, headers=operator)
    assert created.status_code == 201, created.get_data(as_text=True)
    assert created.get_json() == {**body, "tag": None, "enabled": True, "last_run_at": None,
                                  "retention": {"keep_last": 3, "daily": 0, "weekly": 4, "monthly": 0}}

    changed = client.patch("/policies/nightly", json={"schedule": "30 1 * * *", "enabled": False}, headers=operator)
    assert changed.status_code == 200, changed.get_data(as_text=True)
    listed = client.get("/policies", headers=bearer(tokens["viewer"])).get_json()["items"]
    assert [(p["name"], p["schedule"], p["enabled"], p["vms"]) for p in listed] == [
        ("nightly", "30 1 * * *", False, ["web", "db"])]
    with rt.sessions() as session:
        assert session.scalar(select(BackupPolicy.schedule)) == "30 1 * * *"


@pytest.mark.parametrize("changes, field", [
    ({"schedule": "every night"}, "schedule"), ({"schedule": "61 * * * *"}, "schedule"),
    ({"full_schedule": "0 3 * *"}, "full_schedule"), ({"mode": "incremental"}, "mode"),
    ({"retention": {"keep_last": -1}}, "retention.keep_last"), ({"retention": {"yearly": 1}}, "yearly"),
    ({"vms": ["Web"]}, "vms"), ({"vms": []}, "vms"), ({"enabled": "yes"}, "enabled"),
])
def test_bad_policies_are_refused(rt, client, tokens, changes, field):
    add_store(rt)
    body = {"name": "nightly", "vms": ["web"], "schedule": "0 3 * * *", "store": "local", **changes}
    problem = assert_problem(client.post("/policies", json=body, headers=bearer(tokens["operator"])), 422,
                             "InvalidInput")
    assert problem["field"] == field
    with rt.sessions() as session:
        assert session.scalar(select(BackupPolicy.id)) is None


def test_patching_a_missing_policy_is_not_found(rt, client, tokens):
    assert_problem(client.patch("/policies/none", json={"enabled": False}, headers=bearer(tokens["operator"])),
                   404, "PolicyNotFound")


def test_a_restore_as_a_new_vm_reserves_it_like_the_original(rt, client, tokens):
    add_store(rt)
    with transaction(rt.sessions) as session:
        factories.subnet(session)
        factories.vm(session, "web", disk_bytes=64 * MIB, template_row=factories.template(session))
        factories.vm(session, "orphan", disk_bytes=64 * MIB)
    backup = add_backup(rt, "web", minutes_ago=1)
    operator = bearer(tokens["operator"])
    untemplated = client.post(f"/backups/{add_backup(rt, 'orphan', minutes_ago=1)}/actions/restore",
                              json={"as_vm": "orphan-twin"}, headers=operator)
    assert_problem(untemplated, 404, "VmNotFound")

    job = client.post(f"/backups/{backup}/actions/restore", json={"as_vm": "web-twin"}, headers=operator)
    assert job.status_code == 202, job.get_json()
    assert (job.get_json()["kind"], job.get_json()["target"], job.get_json()["queue"]) == ("restore-vm", "vm/web-twin", "control")
    with rt.sessions() as session:
        vms = {vm.name: vm for vm in session.scalars(select(VirtualMachine))}
    assert (vms["web-twin"].state, vms["web-twin"].memory_bytes, vms["web-twin"].template_id) == (
        "installing", vms["web"].memory_bytes, vms["web"].template_id)

    before = len(vms)
    for body, status, code in (({"as_vm": "web"}, 409, "VmExists"), ({"as_vm": "Bad_Name"}, 422, "InvalidInput"),
                               ({"as_vm": "x", "in_place": True}, 422, "InvalidInput")):
        assert_problem(client.post(f"/backups/{backup}/actions/restore", json=body, headers=operator), status, code)
    with rt.sessions() as session:
        assert len(session.scalars(select(VirtualMachine)).all()) == before


def test_a_backup_naming_no_store_goes_to_the_default_store_among_several(rt, client, tokens):
    with transaction(rt.sessions) as session:
        factories.vm(session, "web", disk_bytes=64 * MIB)
    add_store(rt, "bk1")
    add_store(rt, "local")
    response = client.post("/vms/web/backups", json={}, headers=bearer(tokens["operator"]))
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_json()["params"]["store"] == rt.config.section("backups")["default_store"] == "local"
