"""Fencing a server at the SAN on the lab: a guest still running there can no longer write its disk, the
fence survives a re-export of the site, and `server activate` stops the cut-off guest, lets the server back
in and the VM starts again with what it had written before the fence."""

import secrets
import time

import pytest
from sqlalchemy import select

from models import SUCCEEDED, ClusterServer
from tasks.node.heartbeat import silence_key
from tasks.san.storage import target_for
from tests.fixtures.check import assert_clean
from tests.fixtures.guest import on_disk, read_probe, write_and_sync
from tests.fixtures.vms import boot_line, install, libvirt_state, run_job, server_uri, unique, vm_uuid

pytestmark = [pytest.mark.integration, pytest.mark.lab]
def server_row(rt, name: str) -> ClusterServer:
    with rt.sessions() as session:
        return session.scalar(select(ClusterServer).where(ClusterServer.name == name))


def test_a_fenced_server_cannot_write_and_activate_lets_it_back(checked_cluster, celery_app, drift_baseline):
    rt, name = checked_cluster, unique("fence")
    assert install(rt, celery_app, name, server="cs1").state == SUCCEEDED
    cs1 = server_uri(rt, "cs1")
    assert boot_line(cs1, name)[0] == name
    before, after = f"before-{secrets.token_hex(6)}", f"after-{secrets.token_hex(6)}"
    assert write_and_sync(cs1, name, before, timeout=60) and on_disk(rt, name, before)
    initiator = server_row(rt, "cs1").initiator_iqn
    tgt = target_for(rt.config.san("san-a")[1])
    try:
        fenced = run_job(rt, celery_app, "fence-server", {"server": "cs1"})
        assert fenced.state == SUCCEEDED, fenced.error_message
        row = server_row(rt, "cs1")
        assert row.fenced_at is not None and row.maintenance is True
        rt.redis.set(silence_key("cs1"), time.time() - 3600)  # what the watcher kept from the failure
        targets = tgt.list_targets()
        assert any(t.iqn in fenced.result["targets"] for t in targets)
        assert not [t.iqn for t in targets if initiator in t.initiators or any(n.initiator == initiator for n in t.nexuses)]

        # The guest on cs1 still runs, but its writes never reach the SAN.
        assert not write_and_sync(cs1, name, after, timeout=20)
        assert not on_disk(rt, name, after)
        # A re-export of the site (as after a tgtd restart) keeps cs1 out.
        assert run_job(rt, celery_app, "repair-san", {"san": "san-a", "actions": [
            {"op": "restore-exports", "what": "san-a"}]}).state == SUCCEEDED
        assert not [t.iqn for t in tgt.list_targets() if initiator in t.initiators]
    finally:
        activated = run_job(rt, celery_app, "activate-server", {"server": "cs1"})
    assert activated.state == SUCCEEDED, activated.error_message
    assert activated.result["was_fenced"] is True and activated.result["stopped"] == [vm_uuid(rt, name)]
    row = server_row(rt, "cs1")
    assert row.fenced_at is None and row.maintenance is False
    assert not rt.redis.exists(silence_key("cs1"))
    assert all(initiator in t.initiators for t in tgt.list_targets() if t.iqn in fenced.result["targets"])

    assert run_job(rt, celery_app, "start", {"vm": name}).state == SUCCEEDED
    assert libvirt_state(cs1, name) is not None
    assert boot_line(cs1, name)[0] == name
    assert read_probe(cs1, name) == before
    assert run_job(rt, celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED
    assert_clean(rt, celery_app, drift_baseline)
