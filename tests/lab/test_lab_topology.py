"""The lab's shape comes from the config alone: names, addresses, ports."""

from pathlib import Path

import pytest

import config
from errors import InvalidInput
from lab.testing import make_test_config
from lab.topology import IFNAME_MAX, build, san_portal, server_uri, tgt_control_port


def test_default_lab_has_every_host_with_its_configured_addresses() -> None:
    cfg = config.load(config.DEFAULTS, environ={})
    topo = build(cfg)

    assert [(h.name, h.kind, h.site) for h in topo.hosts] == [
        ("san-a", "san", "site-a"), ("san-b", "san", "site-b"),
        ("cs1", "server", "site-a"), ("cs2", "server", "site-a"), ("cs3", "server", "site-b"),
        ("bk1", "backup", "site-a"),
    ]
    configured = {s.name: s.addresses for _, s in cfg.sans()} | {s.name: s.addresses for _, _, s in cfg.servers()}
    configured["bk1"] = {"backup": "10.253.0.30"}
    assert {h.name: h.addresses for h in topo.hosts} == configured
    assert topo.host("cs1").netns == "lx-cs1"
    assert [n.bridge for n in topo.networks] == ["lx-mgmt", "lx-storage", "lx-backup"]
    assert str(topo.networks[0].bridge_address) == "10.251.0.1/24"
    # veth index = the network's position in the config, so cs1's storage link is 1 although it has no backup link
    assert [(l.veth, l.inner, str(l.address)) for l in topo.host("cs1").links] == [
        ("lxcs10", "mgmt", "10.251.0.11/24"), ("lxcs11", "storage", "10.252.0.11/24"),
    ]
    assert topo.host("san-b").address("backup") == "10.253.0.20"


def test_test_config_gives_a_distinct_lab_with_short_names(tmp_path: Path) -> None:
    cfg = config.load(make_test_config(tmp_path), environ={})
    topo = build(cfg)
    default = build(config.load(config.DEFAULTS, environ={}))

    assert topo.prefix != default.prefix and topo.prefix.startswith("lt")
    assert not any(a.cidr.overlaps(b.cidr) for a in topo.networks for b in default.networks)
    names = [n.bridge for n in topo.networks] + [l.veth for h in topo.hosts for l in h.links]
    assert all(name.startswith(topo.prefix) and len(name) <= IFNAME_MAX for name in names)
    assert len(set(names)) == len(names)
    assert topo.lab_dir == (tmp_path / "var" / "lab").resolve()
    cs1 = topo.host("cs1")
    assert server_uri(cfg, "cs1") == f"qemu+tcp://{cs1.address('mgmt')}/system"
    assert san_portal(cfg, "san-a") == (topo.host("san-a").address("storage"), 3260)
    assert tgt_control_port(cfg, "san-b") == tgt_control_port(cfg, "san-a") + 1
    assert all(s.pool_size == 4 << 30 and s.pool_path.is_relative_to(topo.lab_dir) for _, s in cfg.sans())


def _config_with(tmp_path: Path, host_name: str, mgmt: str) -> config.Config:
    path = tmp_path / "lab.toml"
    path.write_text(f"""
[lab]
prefix = "lx"
[lab.networks.mgmt]
cidr = "10.9.0.0/24"
bridge_address = "10.9.0.1"
[[sites]]
name = "s"
[[sites.clusters]]
name = "c"
[[sites.clusters.servers]]
name = "{host_name}"
uri = "qemu+tcp://{mgmt}/system"
initiator = "iqn.x:y"
addresses = {{ mgmt = "{mgmt}" }}
""")
    return config.load(path, environ={})


def test_a_name_too_long_for_an_interface_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="longer than 15"):
        build(_config_with(tmp_path, "server-with-long-name", "10.9.0.5"))


def test_an_address_outside_its_network_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="outside 10.9.0.0/24"):
        build(_config_with(tmp_path, "cs9", "10.8.0.5"))


def test_each_vm_network_is_a_root_bridge_on_its_gateway_joined_by_each_bridging_server() -> None:
    topo = build(config.load(config.DEFAULTS, environ={}))

    assert [(n.name, n.bridge, str(n.bridge_address), n.subnet, n.dhcp) for n in topo.vm_networks] == [
        ("vm-a", "lx-vm-a", "10.254.0.1/24", "lab", True), ("vm-b", "lx-vm-b", "10.254.1.1/24", "lab-b", True)]
    assert [(l.network, l.veth, l.inner, l.server_bridge) for l in topo.host("cs2").vm_links] == [
        ("vm-a", "lxcs2v0", "vm-a", "vmbr0")]
    assert [(l.network, l.veth) for l in topo.host("cs3").vm_links] == [("vm-a", "lxcs3v0"), ("vm-b", "lxcs3v1")]
    assert topo.host("san-a").vm_links == ()


def test_a_vm_network_spans_two_sites_only_when_both_say_it_is_stretched(tmp_path: Path) -> None:
    path = tmp_path / "unstretched.toml"
    path.write_text(config.DEFAULTS.read_text().replace("stretched = true\n", "", 1))
    with pytest.raises(InvalidInput, match="stretched = true"):
        build(config.load(path, environ={}))
    # The lab stretches vm-a to site-b (for DR): one segment, joined by cs3 as well.
    topo = build(config.load(config.DEFAULTS, environ={}))
    assert [n.name for n in topo.vm_networks] == ["vm-a", "vm-b"]
    assert {h.name: [l.network for l in h.vm_links] for h in topo.servers()} == {
        "cs1": ["vm-a"], "cs2": ["vm-a"], "cs3": ["vm-a", "vm-b"]}
