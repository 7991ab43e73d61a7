"""DR on the lab, over the API: a VM on site-a replicates continuously to san-b while its guest writes, with an
RPO under its target; site-a dies (every daemon and guest of san-a, cs1 and cs2 killed) and an unplanned failover
runs the VM on cs3 with what the newest replica held; when site-a comes back it refuses to start or export its
stale copy; failback ships only what changed at site-b and brings the VM home with that change. A drill boots a
replica at site-b with no network while the VM runs on untouched, and a planned failover loses nothing."""

import secrets
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
import requests
from sqlalchemy import select

from lab import cluster as lab_cluster
from lab import netns, processes
from lab.processes import wait_until
from lab.topology import build
from models import FAILED, SUCCEEDED, ClusterServer, VirtualMachine, Volume
from tasks.queues import san_queue
from tasks.san.storage import target_for
from tests.fixtures.check import assert_clean, run_check
from tests.fixtures.guest import read_probe, write_and_sync
from tests.fixtures.http import bearer
from tests.fixtures.vms import boot_line, console_answer, domain_named, install, run_job, server_uri, unique, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.lab]

SHIP_TIMEOUT_S = 240
RPO_TARGET_S = 45


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.headers = url, bearer(token)

    def post(self, path: str, body: dict) -> dict:
        response = requests.post(self.url + path, json=body, headers=self.headers, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()

    def get(self, path: str) -> dict:
        response = requests.get(self.url + path, headers=self.headers, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()


def job_done(rt, job: dict, timeout: float = SHIP_TIMEOUT_S):
    ended = wait_job(rt, job["id"], timeout)
    assert ended.state == SUCCEEDED, f"{ended.kind}: {ended.error_code}: {ended.error_message}"
    return ended


def point_after(api: Api, name: str, moment: datetime) -> dict:
    """Until the VM's newest replica point was taken after `moment`; that point."""
    def newer() -> dict | None:
        status = api.get(f"/vms/{name}/replication")
        newest = status["points"][0] if status["points"] else None
        return newest if newest and datetime.fromisoformat(newest["taken_at"].rstrip("Z")) > moment else None
    return wait_until(newer, SHIP_TIMEOUT_S, f"a replica point of {name} newer than {moment}")


def placed_on(rt, name: str) -> str | None:
    with rt.sessions() as session:
        return session.scalar(select(ClusterServer.name).join(VirtualMachine, VirtualMachine.server_id == ClusterServer.id)
                              .where(VirtualMachine.name == name))


def disk_target(rt, name: str) -> str:
    with rt.sessions() as session:
        return session.scalar(select(Volume.iscsi_target).join(VirtualMachine).where(VirtualMachine.name == name,
                                                                                     Volume.role == "disk"))


def start_noise(uri: str, name: str) -> None:
    """A writer in the guest: 256 KiB of random data rewritten and synced every second, started once."""
    loop = ("[ -f /tmp/noise.pid ] || { (while :; do dd if=/dev/urandom of=/root/noise bs=64k count=4 conv=notrunc "
            "2>/dev/null; sync; sleep 1; done) >/dev/null 2>&1 & echo $! > /tmp/noise.pid; }; echo noise=$(cat /tmp/noise.pid)")
    console_answer(uri, name, loop, r"noise=\d+")


@pytest.fixture
def dr_lab(checked_cluster, celery_worker):
    """The lab with beat (the replication dispatcher) and workers on every SAN's queue."""
    celery_worker(["control"], beat=True)
    return checked_cluster


@pytest.fixture
def site_a_stopped(dr_lab) -> Iterator:
    """A function killing every process of site-a's hosts (san-a's tgtd, libvirtd and sshd; cs1's and cs2's
    libvirtd and guests); the lab is brought up again after the test whatever happens."""
    hosts = [host for host in build(dr_lab.config).hosts if host.site == "site-a" and host.kind in ("server", "san")]

    def stop() -> None:
        for host in hosts:
            processes.stop(netns.netns_pids(host.netns))

    try:
        yield stop
    finally:
        lab_cluster.up(dr_lab.config)


def test_a_vm_fails_over_when_its_site_dies_and_fails_back_with_only_the_deltas(
        dr_lab, celery_app, drift_baseline, served_api, tokens, site_a_stopped):
    rt, name = dr_lab, unique("dr")
    api = Api(served_api.url, tokens["operator"])
    assert install(rt, celery_app, name, server="cs1").state == SUCCEEDED
    cs1, cs3 = server_uri(rt, "cs1"), server_uri(rt, "cs3")
    assert boot_line(cs1, name)[0] == name
    old_target = disk_target(rt, name)

    job_done(rt, api.post(f"/vms/{name}/replication", {"rpo_target_s": RPO_TARGET_S}))
    start_noise(cs1, name)
    # Continuous: while the guest writes, ships keep coming and the newest replica stays younger than the target.
    watched_from = datetime.utcnow()
    for _ in range(3):
        point_after(api, name, datetime.utcnow())
    status = api.get(f"/vms/{name}/replication")
    assert status["state"] == "ok" and status["rpo_s"] < RPO_TARGET_S, status
    shipped = [p for p in status["points"] if datetime.fromisoformat(p["taken_at"].rstrip("Z")) > watched_from]
    assert shipped and all(0 < p["bytes_changed"] < 64 << 20 for p in shipped), status["points"]

    marker = f"before-{secrets.token_hex(6)}"
    assert write_and_sync(cs1, name, marker, timeout=60)
    newest = point_after(api, name, datetime.utcnow())

    site_a_stopped()
    failover = job_done(rt, api.post(f"/vms/{name}/failover", {"planned": False}))
    assert (failover.result["server"], failover.result["site"]) == ("cs3", "site-b")
    assert int(failover.result["point"].removeprefix("rep-")) >= int(newest["name"].removeprefix("rep-"))
    assert boot_line(cs3, name)[0] == name
    assert read_probe(cs3, name) == marker
    status = api.get(f"/vms/{name}/replication")
    assert (status["primary_site"], status["generation"], status["state"]) == ("site-b", 2, "paused")

    # Site-a returns: its servers and SAN refuse the stale copy.
    lab_cluster.up(rt.config)
    for kind, params in [("start-domain", {"vm": name, "server": "cs1"}),
                         ("export-vm-disks", {"vm": name, "san": "san-a", "initiator": "iqn.2026-11.org.laxcluster:cs1"})]:
        refused = run_job(rt, celery_app, kind, params)
        assert (refused.state, refused.error_code) == (FAILED, "NotPrimary"), refused.error_message
    tgt = target_for(rt.config.san("san-a")[1])
    assert tgt.find(old_target) is None
    # A tgtd that kept the old target (only the SAN's worker was away) loses it when the worker restores exports.
    tgt.ensure_target(old_target)
    celery_app.send_task("laxcluster.restore_exports", args=["san-a"], queue=san_queue("site-a")).get(timeout=60)
    assert tgt.find(old_target) is None
    # cs1 kept the stale definition (its libvirtd was gone when the failover ran): stopped, and `check --repair` removes it.
    assert domain_named(cs1, name).state == "shut off"
    repaired = run_check(rt, celery_app, repair=True)
    assert any(d["resource"] == "domain" and d["where"] == "cs1" for d in repaired["drifts"]), repaired["drifts"]
    assert domain_named(cs1, name) is None

    changed = f"after-{secrets.token_hex(6)}"
    assert write_and_sync(cs3, name, changed, timeout=60)
    failback = job_done(rt, api.post(f"/vms/{name}/failback", {}))
    home = failback.result["server"]
    assert home in ("cs1", "cs2") and failback.result["site"] == "site-a"
    disk_bytes = 1 << 30
    assert 0 < failback.result["bytes_changed"] < disk_bytes // 10, failback.result
    assert failback.result["bytes_sent"] <= 1.1 * failback.result["bytes_changed"] + (1 << 20)
    assert boot_line(server_uri(rt, home), name)[0] == name
    assert read_probe(server_uri(rt, home), name) == changed
    assert domain_named(cs3, name) is None
    status = api.get(f"/vms/{name}/replication")
    assert (status["primary_site"], status["generation"], status["enabled"]) == ("site-a", 3, True)
    point_after(api, name, datetime.utcnow())

    assert_clean(rt, celery_app, drift_baseline)
    job_done(rt, requests_delete(api, f"/vms/{name}/replication"))
    deleted = run_job(rt, celery_app, "delete-vm", {"vm": name})
    assert deleted.state == SUCCEEDED, deleted.error_message
    assert_clean(rt, celery_app, drift_baseline)


def requests_delete(api: Api, path: str) -> dict:
    response = requests.delete(api.url + path, headers=api.headers, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def test_a_drill_boots_a_replica_in_isolation_and_a_planned_failover_loses_nothing(
        dr_lab, celery_app, drift_baseline, served_api, tokens):
    rt, name = dr_lab, unique("drill")
    api = Api(served_api.url, tokens["operator"])
    assert install(rt, celery_app, name, server="cs1").state == SUCCEEDED
    cs1, cs3 = server_uri(rt, "cs1"), server_uri(rt, "cs3")
    assert boot_line(cs1, name)[0] == name
    job_done(rt, api.post(f"/vms/{name}/replication", {"mode": "scheduled", "schedule": "0 0 1 1 *"}))
    running = domain_named(cs1, name)

    drill = job_done(rt, api.post(f"/vms/{name}/drill", {}))
    assert drill.result["came_up"] is True and drill.result["site"] == "site-b", drill.result
    # Production untouched: the same domain runs on cs1, nothing of the drill is left on cs3.
    assert domain_named(cs1, name).domain_id == running.domain_id
    assert domain_named(cs3, f"drill-{vm_uuid_prefix(rt, name)}") is None
    assert api.get(f"/vms/{name}/replication")["enabled"] is True

    marker = f"before-{secrets.token_hex(6)}"
    assert write_and_sync(cs1, name, marker, timeout=60)
    started = time.monotonic()
    failover = job_done(rt, api.post(f"/vms/{name}/failover", {}))
    assert failover.result["planned"] is True and failover.result["server"] == "cs3"
    assert time.monotonic() - started < 180
    assert boot_line(cs3, name)[0] == name
    assert read_probe(cs3, name) == marker
    assert domain_named(cs1, name) is None
    assert_clean(rt, celery_app, drift_baseline)
    deleted = run_job(rt, celery_app, "delete-vm", {"vm": name})
    assert deleted.state == SUCCEEDED, deleted.error_message
    assert_clean(rt, celery_app, drift_baseline)


def vm_uuid_prefix(rt, name: str) -> str:
    with rt.sessions() as session:
        return session.scalar(select(VirtualMachine.uuid).where(VirtualMachine.name == name))[:8]
