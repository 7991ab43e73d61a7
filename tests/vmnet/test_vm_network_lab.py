"""The VM network on the lab: tiny guests on site-a's network vm-a (a bridge in each server's namespace,
joined to one in the root namespace that carries the subnet's gateway) get their leased address from the
lab's dnsmasq, answer TCP from the root namespace, and keep a connection across a migration (live, or
paused where live would corrupt the guest: TCG on QEMU before 9.0, as here)."""

import re
import subprocess

import libvirt
import pytest
from sqlalchemy import select

from lab.processes import wait_until
from lab.topology import build
from models import SUCCEEDED, VirtualMachine
from models.db import transaction
from tasks.inventory import ipam
from tasks.inventory.vmnet import publish_leases
from tasks.inventory.vms import InstallRequest, reserve_vm
from lab.echo import ECHO_STARTED, START_ECHO, EchoStream, connect_to, echo
from tests.fixtures.vms import boot_line, lease_of, libvirt_state, moves_live, run_job, server_uri, unique
from workers.node.console import SerialConsole, start_event_loop
from workers.node.host import connect

pytestmark = [pytest.mark.integration, pytest.mark.lab]
SUBNET = "lab"  # carried by site-a's VM network vm-a, served by DHCP (config/defaults.toml)
MIGRATE_TIMEOUT = 300


def install_on_vm_network(rt, celery_app, name: str, server: str) -> tuple[str, str]:
    """Install tiny VM `name` on `server` with a lease on the VM network; return its (MAC, IP)."""
    with transaction(rt.sessions) as session:
        reserve_vm(session, rt.config, InstallRequest(name=name, template="tiny", memory_bytes=256 << 20, vcpus=1,
                                                      disk_bytes=128 << 20, subnet=SUBNET, server=server))
    installed = run_job(rt, celery_app, "install-vm", {"vm": name, "disk_bytes": 128 << 20, "server": server})
    assert installed.state == SUCCEEDED, installed.error_message
    return lease_of(rt, name)


def on_console(rt, server: str, name: str, command: str, answer: str, timeout: float = 60) -> re.Match:
    """Type `command` into the guest's serial console shell and wait for `answer` (a regex) to appear."""
    start_event_loop()
    conn = connect(server_uri(rt, server))
    try:
        with SerialConsole(conn.lookupByName(name)) as console:
            console.write(command.encode() + b"\n")
            return console.read_until(answer, timeout)
    finally:
        conn.close()


def start_echo_service(rt, server: str, name: str) -> None:
    on_console(rt, server, name, START_ECHO, ECHO_STARTED)


def test_a_guest_gets_its_lease_by_dhcp_and_answers_tcp_from_the_root_namespace(cluster, celery_app):
    rt, name = cluster, unique("net")
    net = next(n for n in build(rt.config).vm_networks if n.subnet == SUBNET)
    try:
        mac, ip = install_on_vm_network(rt, celery_app, name, "cs1")
        # The seed carries no address (`type: dhcp`): the one the guest reports came from dnsmasq.
        assert boot_line(server_uri(rt, "cs1"), name) == (name, ip)
        leases = rt.config.dhcp_dir / f"{net.name}.leases"
        wait_until(lambda: f" {mac} {ip} " in leases.read_text(), 10, f"dnsmasq to record the lease of {mac}")
        start_echo_service(rt, "cs1", name)
        with connect_to(ip) as sock:
            assert sock.getsockname()[0] == str(net.bridge_address.ip)  # the root namespace, on the VM network
            assert echo(sock, b"hello over the VM network\n") == b"hello over the VM network\n"
    finally:
        run_job(rt, celery_app, "delete-vm", {"vm": name})
    # Deleted, its lease left the DHCP server's hosts file, and dnsmasq released it (its address is free again).
    assert mac not in (rt.config.dhcp_dir / f"{net.name}.hosts").read_text()
    wait_until(lambda: mac not in leases.read_text(), 10, f"dnsmasq to release the lease of {mac}")


def test_a_mac_without_a_lease_gets_no_address(cluster, celery_app):
    rt, name = cluster, unique("nol")
    # udhcpc's exit status (0: an address came, 1: none), then `-1` from `$((1+0))`: unlike the echoed command line.
    ask = "udhcpc -i eth0 -n -q -t 3 -T 1 -s /bin/true >/dev/null 2>&1; echo DHCP-EXIT=$?-$((1+0))"
    try:
        mac, ip = install_on_vm_network(rt, celery_app, name, "cs1")
        assert boot_line(server_uri(rt, "cs1"), name) == (name, ip)
        # While the lease exists, asking again gets an address...
        assert on_console(rt, "cs1", name, ask, r"DHCP-EXIT=(\d+)-1").group(1) == "0"
        with transaction(rt.sessions) as session:
            ipam.release(session, session.scalar(select(VirtualMachine.id).where(VirtualMachine.name == name)))
        with rt.sessions() as session:
            assert publish_leases(session, rt.config, SUBNET) is True  # dnsmasq was told
        # ...once it is gone from the network DB, the same MAC gets nothing.
        assert on_console(rt, "cs1", name, ask, r"DHCP-EXIT=(\d+)-1").group(1) == "1"
        net = next(n for n in build(rt.config).vm_networks if n.subnet == SUBNET)
        log = rt.config.dhcp_dir / f"{net.name}.log"
        refusal = re.compile(rf"DHCPDISCOVER\({net.bridge}\) {mac} no address available")
        wait_until(lambda: refusal.search(log.read_text()), 10, f"dnsmasq to log that {mac} has no address")
    finally:
        run_job(rt, celery_app, "delete-vm", {"vm": name})


def way_to(rt, mac: str, ip: str) -> str:
    """What the root namespace knows of the way to a guest: the root bridge's entry for its MAC, the
    neighbour entry of its address, and the TCP connections to it (retransmits, backoff)."""
    net = next(n for n in build(rt.config).vm_networks if n.subnet == SUBNET)
    fdb, neigh, tcp = (subprocess.run(argv, capture_output=True, text=True, check=False).stdout
                       for argv in (["bridge", "fdb", "show", "br", net.bridge], ["ip", "neigh", "show", ip],
                                    ["ss", "-tni", "dst", ip]))
    return (f"fdb: {[line for line in fdb.splitlines() if mac in line]}; neigh: {neigh.strip()!r}; "
            f"tcp: {' '.join(tcp.split())!r}")


def test_a_tcp_connection_to_the_guest_survives_its_migration(cluster, celery_app):
    rt, name = cluster, unique("nmg")
    try:
        mac, ip = install_on_vm_network(rt, celery_app, name, "cs1")
        boot_line(server_uri(rt, "cs1"), name)
        live = moves_live(server_uri(rt, "cs1"), name)
        start_echo_service(rt, "cs1", name)
        with connect_to(ip) as sock:
            stream = EchoStream(sock)
            stream.start()
            try:
                stream.more_replies(20, "echoes before the migration")
                before = stream.replies
                moved = run_job(rt, celery_app, "migrate", {"vm": name, "to": "cs2"}, timeout=MIGRATE_TIMEOUT)
                during = stream.replies - before
                try:
                    stream.more_replies(20, "echoes after the migration")
                except Exception as stalled:  # noqa: BLE001 - said again with what the network knew then
                    raise AssertionError(f"{stalled!r} after the migration; {way_to(rt, mac, ip)}") from stalled
            finally:
                stream.stop()
        assert moved.state == SUCCEEDED, moved.error_message
        assert moved.result["live"] is live
        assert libvirt_state(server_uri(rt, "cs2"), name) == libvirt.VIR_DOMAIN_RUNNING and libvirt_state(server_uri(rt, "cs1"), name) is None
        assert during > 0 and stream.error is None, stream.error
        print(f"longest gap {stream.longest_gap() * 1000:.0f} ms, libvirt downtime {moved.result['downtime_ms']} ms")
    finally:
        run_job(rt, celery_app, "delete-vm", {"vm": name})
