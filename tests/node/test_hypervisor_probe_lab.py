"""The hypervisor probe against the lab's real libvirtds: this machine lists KVM but cannot run KVM guests,
so the probe must end at qemu, in bounded time, leaving no probe domain; refreshed lab servers show qemu,
and a VM's domain takes its server's kind."""

import time
import uuid
import xml.etree.ElementTree as ET

import pytest
from sqlalchemy import select, update

from models import SUCCEEDED, ClusterServer, VirtualMachine
from models.db import transaction
from tasks.inventory.config_sync import sync_from_config
from tasks.queues import node_queue
from tests.fixtures.vms import install, run_job, server_uri, unique
from workers.node import probe
from workers.node.domain_xml import DomainSpec, domain_xml
from workers.node.domains import session as libvirt_session

pytestmark = [pytest.mark.integration, pytest.mark.lab]
# The probe's own deadline, plus what libvirt gets to start the probe guest and to give up a start.
PROBE_BOUND_S = probe.PROBE_TIMEOUT_S + 2 * probe.START_GRACE_S + 10


def probes_on(uri: str) -> list[str]:
    with libvirt_session(uri) as conn:
        return [domain.name() for domain in conn.listAllDomains() if domain.name().startswith(probe.PROBE_PREFIX)]


def test_the_probe_ends_at_qemu_where_kvm_is_listed_but_cannot_run_guests(rt):
    uri = server_uri(rt, "cs1")
    with libvirt_session(uri) as conn:
        assert probe.offers_kvm(conn), "libvirt here lists KVM (MACHINE-FACTS): the probe, not the list, must decide"
    started = time.monotonic()
    found = probe.detect(uri)
    took = time.monotonic() - started
    # The kernel's real-mode start runs under KVM here; the kernel proper never prints its banner.
    assert found.kind == "qemu" and found.evidence.startswith("kvm probe: the guest's kernel printed no banner in"), found
    assert took < PROBE_BOUND_S, f"the probe took {took:.0f} s"
    assert probes_on(uri) == []


def test_the_probe_sees_a_guest_whose_vcpu_runs(rt):
    # The same watch on a TCG guest, which does run here: the probe can say yes.
    uri = server_uri(rt, "cs1")
    with libvirt_session(uri) as conn:
        assert probe.guest_runs(conn, "qemu", 60) == (True, "the guest's kernel started (it printed its banner)")
    assert probes_on(uri) == []


def test_a_probe_left_by_a_worker_that_died_is_removed_by_the_next_probe(rt):
    uri = server_uri(rt, "cs2")
    leftover = DomainSpec(name=f"{probe.PROBE_PREFIX}dead", uuid=str(uuid.uuid4()), memory_bytes=32 << 20, vcpus=1,
                          hypervisor="qemu", disks=())
    with libvirt_session(uri) as conn:
        conn.createXML(domain_xml(leftover), 0)
        try:
            assert probes_on(uri) == [leftover.name]
            probe.guest_runs(conn, "qemu", 60)
            assert probes_on(uri) == []
        finally:
            probe.remove_probes(conn)


def test_every_lab_server_is_qemu_after_a_refresh(cluster, celery_app, api):
    with transaction(cluster.sessions) as session:
        session.execute(update(ClusterServer).values(hypervisor=None, hypervisor_evidence=None))
    job = run_job(cluster, celery_app, "refresh-servers", {})
    assert job.state == SUCCEEDED, job.error_message
    servers = api.get("/servers").get_json()["items"]
    assert {s["name"]: (s["hypervisor"], s["hypervisor_evidence"]) for s in servers} == {
        name: ("qemu", "set in the configuration") for name in ("cs1", "cs2", "cs3")}


def test_a_vms_domain_takes_its_servers_kind_when_it_starts(cluster, celery_app):
    name = unique("hv")
    assert install(cluster, celery_app, name, server="cs1").state == SUCCEEDED
    with transaction(cluster.sessions) as session:
        # As if the VM had last run on a server of another kind.
        session.execute(update(VirtualMachine).where(VirtualMachine.name == name).values(hypervisor="kvm"))
    for action in ("destroy", "start"):
        job = run_job(cluster, celery_app, action, {"vm": name})
        assert job.state == SUCCEEDED, job.error_message
    with cluster.sessions() as session:
        assert session.scalar(select(VirtualMachine.hypervisor).where(VirtualMachine.name == name)) == "qemu"
    with libvirt_session(server_uri(cluster, "cs1")) as conn:
        assert ET.fromstring(conn.lookupByName(name).XMLDesc(0)).get("type") == "qemu"


def test_a_refresh_probes_a_server_whose_kind_the_config_leaves_out(rt, celery_app, celery_worker, lax_env, tmp_path):
    unset = tmp_path / "laxcluster.toml"
    cs1 = 'initiator = "iqn.2026-11.org.laxcluster:cs1"\n'
    text = rt.config.path.read_text()
    assert f'{cs1}hypervisor = "qemu"\n' in text
    unset.write_text(text.replace(f'{cs1}hypervisor = "qemu"\n', cs1))
    lax_env["LAXCLUSTER_CONFIG"] = str(unset)  # the worker reads this config
    with transaction(rt.sessions) as session:
        sync_from_config(session, rt.config)
        session.execute(update(ClusterServer).values(hypervisor=None, hypervisor_evidence=None))
    celery_worker([node_queue("cs1")])
    job = run_job(rt, celery_app, "refresh-server", {"server": "cs1"}, timeout=PROBE_BOUND_S + 60)
    assert job.state == SUCCEEDED, job.error_message
    with rt.sessions() as session:
        cs1 = session.scalar(select(ClusterServer).where(ClusterServer.name == "cs1"))
        assert cs1.hypervisor == "qemu"
        assert cs1.hypervisor_evidence.startswith("kvm probe: the guest's kernel printed no banner in 15 s"), \
            cs1.hypervisor_evidence
    assert probes_on(server_uri(rt, "cs1")) == []
