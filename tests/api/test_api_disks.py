"""A VM's disks over HTTP: listed by volume id, added and removed as jobs, every wrong request a stable problem."""

import pytest
from sqlalchemy import select

from models import San, VirtualMachine, Volume
from models.db import transaction
from tasks.control.disks import MAX_DATA_DISKS
from tests.fixtures import factories
from tests.fixtures.http import assert_problem, bearer


@pytest.fixture
def vm_id(rt) -> int:
    """VM `web1` with a 1 GiB boot disk on san-a (LUN 1) and a seed (LUN 2)."""
    with transaction(rt.sessions) as session:
        vm = factories.vm(session, "web1", template_row=factories.template(session), disk_bytes=1 << 30)
        disk = session.scalar(select(Volume).where(Volume.vm_id == vm.id))
        disk.iscsi_lun = 1
        session.add(Volume(name="web1-seed", san_id=disk.san_id, vm_id=vm.id, role="seed", size_bytes=1 << 20,
                           backend_handle="web1-seed", iscsi_lun=2))
        return vm.id


def add_data_disks(rt, vm_id: int, count: int) -> list[int]:
    with transaction(rt.sessions) as session:
        san_id = session.scalar(select(San.id).where(San.name == "san-a"))
        rows = [Volume(name=f"web1-data{n}", san_id=san_id, vm_id=vm_id, role="data", size_bytes=1 << 30,
                       backend_handle=f"web1-data{n}", iscsi_lun=3 + n, label=f"d{n}") for n in range(count)]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def post(client, tokens, body, vm="web1"):
    return client.post(f"/vms/{vm}/disks", json=body, headers=bearer(tokens["operator"]))


def delete(client, tokens, disk, vm="web1"):
    return client.delete(f"/vms/{vm}/disks/{disk}", headers=bearer(tokens["operator"]))


def test_adding_a_disk_is_an_add_disk_job_on_the_vms_lock(client, tokens, vm_id):
    response = post(client, tokens, {"size": "2G", "label": "pgdata"})
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert (job["kind"], job["target"], job["queue"]) == ("add-disk", "vm/web1", "control")
    assert job["params"] == {"vm": "web1", "size_bytes": 2 << 30, "label": "pgdata"}
    assert post(client, tokens, {"size": "1G"}).status_code == 409  # one job per VM at a time


def test_name_is_another_word_for_label(client, tokens, vm_id):
    response = post(client, tokens, {"size": "1G", "name": "logs"})
    assert response.get_json()["params"]["label"] == "logs"


@pytest.mark.parametrize("body, field", [
    ({}, "size"), ({"size": 1073741824}, "size"), ({"size": "1X"}, "size"), ({"size": "1M"}, "size"),
    ({"size": "3T"}, "size"), ({"size": "1G", "label": "Bad Label"}, "label"),
    ({"size": "1G", "label": "a", "name": "b"}, "label"), ({"size": "1G", "lun": 7}, "lun"),
])
def test_a_bad_request_is_refused_before_any_job(rt, client, tokens, vm_id, body, field):
    problem = assert_problem(post(client, tokens, body), 422, "InvalidInput")
    assert problem.get("field") == field
    with rt.sessions() as session:
        assert session.scalar(select(VirtualMachine).where(VirtualMachine.id == vm_id)) is not None


def test_an_unknown_vm_or_disk_is_404(client, tokens, vm_id):
    assert_problem(post(client, tokens, {"size": "1G"}, vm="nope"), 404, "VmNotFound")
    assert_problem(delete(client, tokens, 999, vm="nope"), 404, "VmNotFound")
    assert_problem(delete(client, tokens, 999), 404, "DiskNotFound")
    assert_problem(client.get("/vms/nope/disks", headers=bearer(tokens["viewer"])), 404, "VmNotFound")


def test_another_vms_disk_is_not_found_here(rt, client, tokens, vm_id):
    with transaction(rt.sessions) as session:
        other = factories.vm(session, "db1", disk_bytes=1 << 30)
        disk = session.scalar(select(Volume.id).where(Volume.vm_id == other.id))
    assert_problem(delete(client, tokens, disk), 404, "DiskNotFound")


def test_the_boot_disk_and_the_seed_are_not_removable(rt, client, tokens, vm_id):
    with rt.sessions() as session:
        ids = list(session.scalars(select(Volume.id).where(Volume.vm_id == vm_id)))
    for volume_id in ids:
        assert_problem(delete(client, tokens, volume_id), 409, "BootDiskNotRemovable")


def test_too_many_disks_is_refused(rt, client, tokens, vm_id):
    add_data_disks(rt, vm_id, MAX_DATA_DISKS)
    assert_problem(post(client, tokens, {"size": "1G"}), 409, "TooManyDisks")


def test_disks_are_listed_in_lun_order_on_the_vm_and_on_their_own(rt, client, tokens, vm_id):
    data = add_data_disks(rt, vm_id, 2)
    listed = client.get("/vms/web1/disks", headers=bearer(tokens["viewer"])).get_json()["items"]
    assert [(d["role"], d["iscsi_lun"], d["label"]) for d in listed] == [("disk", 1, None), ("data", 3, "d0"),
                                                                          ("data", 4, "d1")]
    assert [d["id"] for d in listed[1:]] == data
    shown = client.get("/vms/web1", headers=bearer(tokens["viewer"])).get_json()
    assert {v["id"] for v in shown["volumes"] if v["role"] == "data"} == set(data)


def test_removing_a_data_disk_is_a_remove_disk_job(rt, client, tokens, vm_id):
    disk = add_data_disks(rt, vm_id, 1)[0]
    response = delete(client, tokens, disk)
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert (job["kind"], job["target"], job["params"]) == ("remove-disk", "vm/web1", {"vm": "web1", "volume_id": disk})


def test_a_viewer_cannot_add_a_disk(client, tokens, vm_id):
    response = client.post("/vms/web1/disks", json={"size": "1G"}, headers=bearer(tokens["viewer"]))
    assert_problem(response, 403, "Forbidden")


def test_a_vm_being_deleted_gets_no_new_disk(rt, client, tokens, vm_id):
    with transaction(rt.sessions) as session:
        session.get(VirtualMachine, vm_id).desired_state = "deleted"
    assert_problem(post(client, tokens, {"size": "1G"}), 409, "VmBeingDeleted")


def test_a_data_disk_grows_or_shrinks_by_its_volume_id_under_the_vms_lock(rt, client, tokens, vm_id):
    disk = add_data_disks(rt, vm_id, 1)[0]
    response = client.post(f"/volumes/{disk}/actions/resize", json={"size": "2G"}, headers=bearer(tokens["operator"]))
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert (job["kind"], job["target"], job["params"]) == ("resize-volume", "vm/web1",
                                                           {"volume_id": disk, "size_bytes": 2 << 30})
