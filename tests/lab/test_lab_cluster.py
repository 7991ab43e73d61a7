"""The lab, brought up for real: namespaces, libvirtds answering over TCP, tgtds, reflink pools; and down."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from click.testing import CliRunner

import config
from cli.main import cli
from lab import cluster, netns, processes, topology
from lab.processes import wait_until
from lab.testing import leftovers, make_test_config
from tests.support import missing, need_lab
from workers.command import run
from workers.san.tgt import Tgt

pytestmark = pytest.mark.integration


def _status_json(cfg: config.Config) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["lab", "status", "--json"], env={"LAXCLUSTER_CONFIG": str(cfg.path)})
    return result.exit_code, json.loads(result.output)


def _pids(report: dict) -> dict[tuple[str, str], int]:
    return {(h["name"], d["name"]): d["pid"] for h in report["hosts"] for d in h["daemons"]}


def test_status_shows_every_host_with_its_addresses_and_answering_daemons(lab: config.Config) -> None:
    exit_code, report = _status_json(lab)

    assert exit_code == 0 and report["up"] is True
    hosts = {h["name"]: h for h in report["hosts"]}
    assert set(hosts) == {"san-a", "san-b", "cs1", "cs2", "cs3", "bk1"}
    assert [d["name"] for d in hosts["bk1"]["daemons"]] == ["sshd"]
    for _site, san in lab.sans():
        assert hosts[san.name]["addresses"] == san.addresses
        assert hosts[san.name]["pool"]["mounted"] and hosts[san.name]["pool"]["loop"].startswith("/dev/loop")
        assert [d["name"] for d in hosts[san.name]["daemons"]] == ["tgtd", "virtlogd", "virtlockd", "libvirtd", "sshd"]
    for _site, _cluster, server in lab.servers():
        assert hosts[server.name]["addresses"] == server.addresses
        assert [d["name"] for d in hosts[server.name]["daemons"]] == ["virtlogd", "virtlockd", "libvirtd"]
    assert all(d["pid"] and d["answers"] for h in report["hosts"] for d in h["daemons"])
    assert all(h["netns_present"] and h["netns"].startswith(report["prefix"] + "-") for h in report["hosts"])
    assert [(n["name"], n["bridge"], n["present"]) for n in report["vm_networks"]] == [
        ("vm-a", f"{report['prefix']}-vm-a", True), ("vm-b", f"{report['prefix']}-vm-b", True)]
    assert all(n["dhcp"]["pid"] and n["dhcp"]["answers"] for n in report["vm_networks"])


def test_the_backup_host_takes_ssh_logins_with_the_labs_key_only(lab: config.Config, tmp_path) -> None:
    bk1 = {h["name"]: h for h in cluster.status(lab)["hosts"]}["bk1"]
    address = bk1["addresses"]["backup"]
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path / 'known'}"]
    marker = tmp_path / "marker"
    logged_in = run([*ssh, "-i", bk1["client_key"], f"root@{address}", "touch", str(marker)], check=False)
    assert logged_in.returncode == 0, logged_in.stderr
    assert marker.exists()
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")])
    refused = run([*ssh, "-i", str(tmp_path / "stranger"), f"root@{address}", "true"], check=False)
    assert refused.returncode == 255 and b"Permission denied" in refused.stderr


def test_each_server_answers_over_tcp_with_its_own_name_and_host_uuid(lab: config.Config) -> None:
    uuids = set()
    for _site, _cluster, server in lab.servers():
        conn = libvirt.open(topology.server_uri(lab, server.name))
        try:
            assert conn.getHostname() == server.name
            uuids.add(ET.fromstring(conn.getCapabilities()).findtext("host/uuid"))
        finally:
            conn.close()
    assert len(uuids) == len(lab.servers())


def test_a_server_reads_a_lun_its_san_exports_over_the_storage_network(lab: config.Config) -> None:
    _site, san = lab.san("san-a")
    cs1 = next(server for _site, _cluster, server in lab.servers() if server.name == "cs1")
    tgt = Tgt(topology.tgt_control_port(lab, "san-a"))
    iqn = f"{lab.raw['iqn_prefix']}:lab-probe-{secrets.token_hex(3)}"
    disk = san.pool_path / f"{iqn.rpartition(':')[2]}.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    try:
        tgt.export_lun(iqn, 1, str(disk))
        tgt.bind_initiators(iqn, [cs1.initiator])
        address, port = topology.san_portal(lab, "san-a")
        opts = f"driver=iscsi,transport=tcp,portal={address}:{port},target={iqn},lun=1,initiator-name={cs1.initiator}"

        # From inside cs1's namespace, as the QEMU of a guest on cs1 would.
        info = run(["ip", "netns", "exec", topology.build(lab).host("cs1").netns, "qemu-img", "info", "--output=json", "--image-opts", opts])

        assert json.loads(info.stdout)["virtual-size"] == 16 << 20
    finally:
        tgt.unexport(iqn, force=True)
        disk.unlink(missing_ok=True)


def test_a_san_pool_is_xfs_with_reflink(lab: config.Config) -> None:
    pool = lab.sans()[0][1].pool_path
    (pool / "probe").write_bytes(os.urandom(1 << 20))
    try:
        run(["cp", "--reflink=always", str(pool / "probe"), str(pool / "probe-clone")])
        assert (pool / "probe-clone").read_bytes() == (pool / "probe").read_bytes()
    finally:
        for name in ("probe", "probe-clone"):
            (pool / name).unlink(missing_ok=True)


def test_up_again_is_harmless(lab: config.Config) -> None:
    _, before = _status_json(lab)

    result = CliRunner().invoke(cli, ["lab", "up", "--json"], env={"LAXCLUSTER_CONFIG": str(lab.path)})

    assert result.exit_code == 0, result.output
    after = json.loads(result.output)
    assert after["up"] is True
    assert _pids(after) == _pids(before)


GUEST_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type><kernel>{kernel}</kernel><cmdline>console=ttyS0</cmdline></os>
  <devices><serial type='pty'/></devices>
</domain>"""


def _start_guest(cfg: config.Config, server: str, kernel: Path) -> int:
    """Start a diskless guest on `server` and return the PID of its QEMU, found in the server's namespace."""
    conn = libvirt.open(topology.server_uri(cfg, server))
    try:
        conn.createXML(GUEST_XML.format(name="probe", kernel=kernel), 0)
    finally:
        conn.close()
    in_netns = netns.netns_pids(topology.build(cfg).host(server).netns)
    qemus = [pid for pid in in_netns if "qemu-system" in " ".join(processes.cmdline(pid))]
    assert len(qemus) == 1
    return qemus[0]


def test_down_after_a_crash_leaves_nothing_behind(tmp_path: Path) -> None:
    need_lab()
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        missing("no kernel in /boot (apt package linux-image-amd64)")
    # In a private (0700) directory: the lab's QEMU must read it anyway.
    kernel = tmp_path / "vmlinuz"
    shutil.copyfile(kernels[-1], kernel)
    cfg = config.load(make_test_config(tmp_path), environ={})
    topo = topology.build(cfg)
    bystander = None
    try:
        report = cluster.up(cfg)
        assert {host for (host, daemon), pid in _pids(report).items() if daemon == "sshd" and pid} == {"san-a", "san-b", "bk1"}
        pids = [pid for pid in _pids(report).values() if pid] + [_start_guest(cfg, "cs2", kernel)]
        pids += [net["dhcp"]["pid"] for net in report["vm_networks"]]
        # Any libvirtd on the machine gives each QEMU a mount namespace like this one, copying the pools' mounts.
        bystander = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sleep", "600"])
        wait_until(lambda: _mount_namespace(bystander.pid) != _mount_namespace(os.getpid()), 10, "the bystander's mount namespace")
        cs1, san_a = report["hosts"][2], report["hosts"][0]
        assert (cs1["name"], san_a["name"]) == ("cs1", "san-a")
        # A crash: cs1's libvirtd and san-a's tgtd die hard, a namespace and a bridge of an older run linger.
        os.kill(_pids(report)[("cs1", "libvirtd")], signal.SIGKILL)
        os.kill(_pids(report)[("san-a", "tgtd")], signal.SIGKILL)
        run(["ip", "netns", "add", f"{topo.prefix}-gone"])
        run(["ip", "link", "add", f"{topo.prefix}-old", "type", "bridge"])
        # ... and the records are lost: down must find san-b's tgtd, cs3's libvirtd and vm-b's dnsmasq all the same.
        (topo.lab_dir / "state.json").unlink()
        (topo.lab_dir / "cs3" / "pids" / "libvirtd.pid").unlink()
        (cfg.dhcp_dir / "vm-b.pid").unlink()
        assert cluster.status(cfg)["up"] is False

        cluster.down(cfg)

        assert leftovers(cfg, pids) == []
        assert _sshds_of(topo) == []
        cluster.down(cfg)  # again: harmless
        assert CliRunner().invoke(cli, ["lab", "status"], env={"LAXCLUSTER_CONFIG": str(cfg.path)}).exit_code == 1
    finally:
        cluster.down(cfg)
        if bystander:
            bystander.kill()
            bystander.wait(10)


def _sshds_of(topo: topology.Topology) -> list[int]:
    """Live sshds started with a config under the lab's directory (the SANs' and backup hosts')."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [pid for pid in pids if "sshd" in (title := " ".join(processes.cmdline(pid))) and str(topo.lab_dir) in title]


def _mount_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")
