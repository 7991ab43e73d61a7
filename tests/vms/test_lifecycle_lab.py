"""VM power actions, concurrent installs, volume resize and SAN facts on the lab, through the API where users go."""

import json
import os
import struct
import threading

import pytest
from sqlalchemy import select

from lab.processes import wait_until
from models import SUCCEEDED, ClusterServer, San, VirtualMachine, Volume
from tasks.queues import san_queue
from tasks.san.storage import target_for
from tests.fixtures.vms import boot_line, domain_named, install, run_job, server_uri, unique, wait_job
from workers.command import output
from workers.node import domains
from workers.node.host import connect

pytestmark = [pytest.mark.integration, pytest.mark.lab]
MiB = 1 << 20


def vm_row(rt, name: str) -> VirtualMachine:
    with rt.sessions() as session:
        return session.scalar(select(VirtualMachine).where(VirtualMachine.name == name))


def server_of(rt, name: str) -> str:
    with rt.sessions() as session:
        return session.get(ClusterServer, vm_row(rt, name).server_id).name


def action(rt, celery_app, verb: str, name: str, **params):
    return run_job(rt, celery_app, verb, {"vm": name, **params})


def lun_size(rt, vm: str, server: str) -> int:
    """The disk's size as the server's initiator sees it over iSCSI (QEMU's own client)."""
    with rt.sessions() as session:
        disk = session.scalar(select(Volume).join(VirtualMachine).where(VirtualMachine.name == vm, Volume.role == "disk"))
        portal = session.get(San, disk.san_id).portal
    initiator = next(s.initiator for _, _, s in rt.config.servers() if s.name == server)
    opts = f"driver=iscsi,transport=tcp,portal={portal},target={disk.iscsi_target},lun={disk.iscsi_lun},initiator-name={initiator}"
    return json.loads(output(["qemu-img", "info", "--output=json", "--image-opts", opts]))["virtual-size"]


@pytest.mark.postgres_too
def test_power_actions_follow_the_guest(cluster, celery_app):
    rt = cluster
    pwr1 = unique("pwr1")
    assert install(rt, celery_app, pwr1).state == SUCCEEDED
    uri = server_uri(rt, server_of(rt, pwr1))
    assert boot_line(uri, pwr1)[0] == pwr1
    shutdown = action(rt, celery_app, "shutdown", pwr1, timeout_s=120)
    assert shutdown.state == SUCCEEDED, shutdown.error_message
    assert vm_row(rt, pwr1).state == "shut off"
    assert action(rt, celery_app, "start", pwr1).state == SUCCEEDED
    assert vm_row(rt, pwr1).state == "running"
    assert boot_line(uri, pwr1)[0] == pwr1
    assert action(rt, celery_app, "reboot", pwr1).state == SUCCEEDED
    assert vm_row(rt, pwr1).state == "running"
    assert action(rt, celery_app, "destroy", pwr1).state == SUCCEEDED
    assert vm_row(rt, pwr1).state == "shut off"


def test_shutdown_right_after_install_powers_the_booting_guest_off(cluster, celery_app):
    # The first ACPI request reaches the guest before its ACPI handler runs; a later one is heard.
    rt = cluster
    name = unique("early1")
    assert install(rt, celery_app, name).state == SUCCEEDED
    shutdown = action(rt, celery_app, "shutdown", name, timeout_s=120)
    assert shutdown.state == SUCCEEDED, shutdown.error_message
    assert vm_row(rt, name).state == "shut off"
    assert domain_named(server_uri(rt, server_of(rt, name)), name).state == "shut off"


def test_a_vm_that_stops_by_itself_is_seen_stopped(cluster, celery_app):
    rt = cluster
    name = unique("self1")
    assert install(rt, celery_app, name).state == SUCCEEDED
    domains.destroy(server_uri(rt, server_of(rt, name)), vm_row(rt, name).uuid)
    wait_until(lambda: vm_row(rt, name).state == "shut off", 20, "the lifecycle event to reach the DB")


@pytest.mark.postgres_too
def test_three_installs_at_once_all_run(cluster, celery_app):
    rt = cluster
    results: dict[str, str] = {}

    def one(name: str) -> None:
        results[name] = install(rt, celery_app, name).state

    names = [unique(f"par{i}") for i in range(3)]
    threads = [threading.Thread(target=one, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert results == dict.fromkeys(names, SUCCEEDED)
    with rt.sessions() as session:
        running = session.scalars(select(VirtualMachine.state).where(VirtualMachine.name.in_(names))).all()
    assert running == ["running"] * 3


@pytest.mark.postgres_too
def test_a_grown_disk_reaches_the_guest_at_its_next_start_and_a_shrink_needs_it_stopped(cluster, celery_app, api):
    rt = cluster
    rsz1 = unique("rsz1")
    assert install(rt, celery_app, rsz1).state == SUCCEEDED
    server = server_of(rt, rsz1)
    disk = next(v for v in api.get(f"/vms/{rsz1}").get_json()["volumes"] if v["role"] == "disk")
    assert lun_size(rt, rsz1, server) == 128 * MiB

    accepted = api.post(f"/volumes/{disk['id']}/actions/resize", json={"size": "192M"})
    assert accepted.status_code == 202
    grown = wait_job(rt, accepted.get_json()["id"])
    assert grown.state == SUCCEEDED and "next stop and start" in grown.result["note"]
    assert lun_size(rt, rsz1, server) == 128 * MiB

    refused = wait_job(rt, api.post(f"/volumes/{disk['id']}/actions/resize", json={"size": "96M"}).get_json()["id"])
    assert (refused.state, refused.error_code, refused.target) == ("failed", "VmNotStopped", f"vm/{rsz1}")

    conn = connect(server_uri(rt, server))  # paused is not stopped: its QEMU still holds the disk
    try:
        conn.lookupByUUIDString(vm_row(rt, rsz1).uuid).suspend()
        wait_until(lambda: vm_row(rt, rsz1).state == "paused", 30, "the pause to reach the DB")
        paused = wait_job(rt, api.post(f"/volumes/{disk['id']}/actions/resize", json={"size": "96M"}).get_json()["id"])
        assert (paused.state, paused.error_code) == ("failed", "VmNotStopped")
    finally:
        conn.close()

    assert action(rt, celery_app, "destroy", rsz1).state == SUCCEEDED
    shrunk = wait_job(rt, api.post(f"/volumes/{disk['id']}/actions/resize", json={"size": "160M"}).get_json()["id"])
    assert shrunk.state == SUCCEEDED, shrunk.error_message
    assert action(rt, celery_app, "start", rsz1).state == SUCCEEDED
    assert lun_size(rt, rsz1, server) == 160 * MiB
    assert boot_line(server_uri(rt, server), rsz1)[0] == rsz1


def test_sans_show_real_pool_facts(cluster, celery_app, api):
    rt = cluster
    accepted = api.post("/sans/san-a/refresh")
    assert accepted.status_code == 202
    assert wait_job(rt, accepted.get_json()["id"]).state == SUCCEEDED
    san_a = next(s for s in api.get("/sans").get_json()["items"] if s["name"] == "san-a")
    stat = os.statvfs(rt.config.san("san-a")[1].pool_path)
    assert san_a["reflink"] is True
    assert abs(san_a["pool_free_bytes"] - stat.f_bavail * stat.f_frsize) < 64 * MiB
    assert san_a["pool_size_bytes"] == stat.f_blocks * stat.f_frsize


def test_a_worker_start_restores_exports_tgtd_lost(cluster, celery_app, celery_worker):
    rt = cluster
    exp1 = unique("exp1")
    assert install(rt, celery_app, exp1).state == SUCCEEDED
    _, san = rt.config.san("san-a")
    tgt = target_for(san)
    iqn = next(t.iqn for t in tgt.list_targets() if t.iqn.endswith(f".vm-{vm_row(rt, exp1).uuid}"))
    tgt.unexport(iqn, force=True)
    assert tgt.find(iqn) is None
    celery_worker([san_queue("site-a")])
    site_a = {s.initiator for _, c, s in rt.config.servers() if c.name == "cluster-a"}

    def restored():
        target = tgt.find(iqn)
        return target if target and set(target.initiators) == site_a else None

    assert sorted(wait_until(restored, 60, "the export and its ACL to be re-created").luns) == [1, 2]


def test_refreshed_servers_show_this_machines_real_facts(cluster, api):
    cs1 = api.get("/servers/cs1").get_json()
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
    assert cs1["cpu_count"] == os.cpu_count()
    assert cs1["memory_total_bytes"] == int(meminfo["MemTotal"].split()[0]) * 1024
    assert 0 < cs1["memory_free_bytes"] <= cs1["memory_total_bytes"]
    assert cs1["hypervisor_type"] == "QEMU" and cs1["reachable"] is True


def test_a_qcow2_image_becomes_a_template_with_the_same_content(cluster, celery_app, api, tiny):
    rt = cluster
    name = unique("tq")
    image = rt.config.import_dir / f"{name}.qcow2"
    output(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(tiny.disk), str(image)])
    accepted = api.post("/templates", json={"name": name, "san": "san-a", "source_path": str(image), "format": "qcow2"})
    assert accepted.status_code == 202, accepted.get_json()
    job = wait_job(rt, accepted.get_json()["id"])
    assert job.state == SUCCEEDED
    listed = {t["name"]: t for t in api.get("/templates").get_json()["items"]}
    assert listed[name]["san"] == "san-a"
    pool = rt.config.san("san-a")[1].pool_path
    output(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(tiny.disk), str(pool / f"{job.result['volume']}.img")])


def test_a_failed_template_import_leaves_no_volume(cluster, celery_app, api, tiny):
    rt = cluster
    pool = rt.config.san("san-a")[1].pool_path
    before = sorted(pool.glob("tpl-*"))
    broken = rt.config.import_dir / f"{unique('broken')}.qcow2"
    output(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(tiny.disk), str(broken)])
    with broken.open("r+b") as image:
        # Point the first L1 entry at an unaligned L2 table: qemu-img info still reads the
        # header, the conversion then fails on the corrupt table, after the volume was made.
        l1_offset = struct.unpack(">Q", image.read(48)[40:48])[0]
        image.seek(l1_offset)
        image.write(struct.pack(">Q", 0x8000000000000201))
    name = unique("bad")
    job = wait_job(rt, api.post("/templates", json={"name": name, "san": "san-a", "source_path": str(broken),
                                                    "format": "qcow2"}).get_json()["id"])
    assert (job.state, job.error_code) == ("failed", "CommandFailed")
    assert sorted(pool.glob("tpl-*")) == before
