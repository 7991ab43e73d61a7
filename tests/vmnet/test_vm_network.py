"""VM networks in the inventory: a lease on a network's subnet puts the VM's NIC on its server's bridge;
placement and migration pre-flight keep a VM off a server without that bridge; the DHCP hosts file is the
network DB's leases."""

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from sqlalchemy import select, update

import config
from errors import NoVmNetwork
from models import ClusterServer, Lease, Subnet, VirtualMachine, Volume
from models.db import transaction
from tasks.control.migrate import network_problems
from tasks.inventory.config_sync import sync_from_config
from tasks.inventory.placement import place_vm
from tasks.inventory.vmnet import publish_leases
from tasks.node.domains import domain_spec
from tests.fixtures import factories
from workers.net.dhcp import hosts_path
from workers.node.domain_xml import domain_xml

GIB = 1 << 30


def config_without_bridge(tmp_path: Path, *servers: str) -> config.Config:
    """The default config, but `servers` join no VM network (their `vm_bridges` line is gone)."""
    text = config.DEFAULTS.read_text()
    for server in servers:
        start = text.index(f'name = "{server}"\n')
        line = text.index("vm_bridges = ", start)
        text = text[:line] + text[text.index("\n", line) + 1:]
    path = tmp_path / "laxcluster.toml"
    path.write_text(text.replace('var_dir = "var"', f'var_dir = "{tmp_path / "var"}"'))
    return config.load(path, environ={})


def vm_on_lab_subnet(session, cfg: config.Config, name: str, server: str | None = None) -> VirtualMachine:
    """A VM row of cluster-a with a disk LUN and a lease on subnet `lab` (carried by VM network vm-a)."""
    sync_from_config(session, cfg)
    session.execute(update(ClusterServer).values(reachable=True, cpu_count=8, memory_total_bytes=8 * GIB,
                                                 memory_free_bytes=8 * GIB))
    subnet = session.scalar(select(Subnet).where(Subnet.name == "lab"))
    cluster_id = session.scalar(select(ClusterServer.cluster_id).where(ClusterServer.name == "cs1"))
    vm = factories.vm(session, name, template_row=factories.template(session), server=server, disk_bytes=GIB, lease_in=subnet,
                      ip="10.254.0.10", cluster_id=cluster_id)
    session.execute(update(Volume).where(Volume.vm_id == vm.id).values(iscsi_target="iqn.2026-11.org.laxcluster:t", iscsi_lun=1))
    return vm


def test_the_nic_of_a_lease_on_a_vm_network_is_on_the_servers_bridge(rt, tmp_path):
    cfg = config_without_bridge(tmp_path, "cs2")
    with transaction(rt.sessions) as session:
        vm = vm_on_lab_subnet(session, cfg, "web1", server="cs1")
        cs1, cs2 = (session.scalar(select(ClusterServer).where(ClusterServer.name == n)) for n in ("cs1", "cs2"))
        mac = vm_mac(session, vm)
        interface = ET.fromstring(domain_xml(domain_spec(session, vm, cs1, cfg))).find("devices/interface")
        assert interface.get("type") == "bridge"
        assert interface.find("source").get("bridge") == "vmbr0" and interface.find("mac").get("address") == mac
        with pytest.raises(NoVmNetwork) as refused:
            domain_spec(session, vm, cs2, cfg)
        assert "cs2 has no bridge on VM network vm-a" in refused.value.message


def test_placement_skips_a_server_without_the_bridge_and_preflight_names_it(rt, tmp_path):
    cfg = config_without_bridge(tmp_path, "cs2")
    with transaction(rt.sessions) as session:
        vm = vm_on_lab_subnet(session, cfg, "web1")
        # cs2 has more room than cs1, yet only cs1 bridges vm-a.
        session.execute(update(ClusterServer).where(ClusterServer.name == "cs2").values(memory_free_bytes=16 * GIB,
                                                                                         memory_total_bytes=16 * GIB))
        cfg.raw["placement"].update(memory_reserve="0")
        assert place_vm(session, cfg, vm, None).name == "cs1"
        cs2 = session.scalar(select(ClusterServer).where(ClusterServer.name == "cs2"))
        problems = network_problems(session, cfg, vm, cs2)
        assert [p["code"] for p in problems] == ["NoVmNetwork"]
        assert "cs2 has no bridge on VM network vm-a" in problems[0]["message"]
        assert network_problems(session, cfg, vm, session.scalar(select(ClusterServer).where(ClusterServer.name == "cs1"))) == []


def test_no_server_of_the_cluster_bridging_the_network_is_no_placement(rt, tmp_path):
    cfg = config_without_bridge(tmp_path, "cs1", "cs2")
    with transaction(rt.sessions) as session:
        vm = vm_on_lab_subnet(session, cfg, "web1")
        with pytest.raises(NoVmNetwork) as refused:
            place_vm(session, cfg, vm, None)
    assert "none of cs1, cs2 has a bridge on VM network vm-a" in refused.value.message


def test_the_dhcp_hosts_file_is_the_subnets_leases(rt, tmp_path):
    cfg = config_without_bridge(tmp_path)
    with transaction(rt.sessions) as session:
        vm = vm_on_lab_subnet(session, cfg, "web1")
        mac = vm_mac(session, vm)
    with rt.sessions() as session:
        assert publish_leases(session, cfg, "lab") is False  # no dnsmasq runs: only the file is written
    assert hosts_path(cfg.dhcp_dir, "vm-a").read_text() == f"{mac},10.254.0.10,web1\n"


def vm_mac(session, vm: VirtualMachine) -> str:
    return session.scalar(select(Lease.mac).where(Lease.vm_id == vm.id))
