"""The VM network on the lab: tiny guests on site-a's network vm-a (a bridge in each server's namespace,
joined to one in the root namespace that carries the subnet's gateway) get their leased address from the
lab's dnsmasq, answer TCP from the root namespace, and keep a connection across a live migration."""

import re
import socket
import threading
import time

import libvirt
import pytest
from sqlalchemy import select

from lab.processes import wait_until
from lab.topology import build
from models import SUCCEEDED, Lease, VirtualMachine
from models.db import transaction
from tasks.inventory import ipam
from tasks.inventory.vmnet import publish_leases
from tasks.inventory.vms import InstallRequest, reserve_vm
from tests.fixtures.vms import boot_line, run_job, server_uri, unique
from workers.node.console import SerialConsole, start_event_loop
from workers.node.host import connect

pytestmark = [pytest.mark.integration, pytest.mark.lab]
SUBNET = "lab"  # carried by site-a's VM network vm-a, served by DHCP (config/defaults.toml)
ECHO_PORT = 7000
MIGRATE_TIMEOUT = 300


def install_on_vm_network(rt, celery_app, name: str, server: str) -> tuple[str, str]:
    """Install tiny VM `name` on `server` with a lease on the VM network; return its (MAC, IP)."""
    with transaction(rt.sessions) as session:
        reserve_vm(session, rt.config, InstallRequest(name=name, template="tiny", memory_bytes=256 << 20, vcpus=1,
                                                      disk_bytes=128 << 20, subnet=SUBNET, server=server))
    installed = run_job(rt, celery_app, "install-vm", {"vm": name, "disk_bytes": 128 << 20, "server": server})
    assert installed.state == SUCCEEDED, installed.error_message
    return lease_of(rt, name)


def lease_of(rt, name: str) -> tuple[str, str]:
    with rt.sessions() as session:
        lease = session.scalar(select(Lease).join(VirtualMachine, Lease.vm_id == VirtualMachine.id)
                               .where(VirtualMachine.name == name))
        return lease.mac, lease.ip


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
    # `$((1+1))` makes the answer differ from the echoed command line.
    on_console(rt, server, name, f"nc -ll -p {ECHO_PORT} -e /bin/cat & echo ECHO-STARTED-$((1+1))", r"ECHO-STARTED-2")


def connect_to(ip: str) -> socket.socket:
    """A TCP connection from the root namespace to the guest's echo service, once it accepts one."""
    def attempt() -> socket.socket | None:
        try:
            return socket.create_connection((ip, ECHO_PORT), timeout=2)
        except OSError:
            return None

    sock = wait_until(attempt, 60, f"the echo service at {ip}:{ECHO_PORT}", interval=0.5)
    sock.settimeout(60)
    return sock


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(len(data) - len(received))
        if not chunk:
            raise ConnectionError(f"the guest closed the connection after {received!r}")
        received += chunk
    return received


class EchoStream(threading.Thread):
    """Numbered lines to the guest's echo service, each awaited before the next: counts the replies and the
    longest wait for one (the connection's longest gap)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(name="echo-stream", daemon=True)
        self.sock, self.replies, self.longest_gap = sock, 0, 0.0
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        last = time.monotonic()
        try:
            while not self.stopping.is_set():
                line = b"%08d\n" % self.replies
                got = echo(self.sock, line)
                if got != line:
                    raise AssertionError(f"sent {line!r}, the guest sent back {got!r}")
                now = time.monotonic()
                self.longest_gap, last = max(self.longest_gap, now - last), now
                self.replies += 1
        except BaseException as error:  # reported by the test, which asserts there was none
            self.error = error

    def more_replies(self, count: int, what: str) -> None:
        target = self.replies + count
        wait_until(lambda: self.replies >= target or self.error is not None, 60, what)
        assert self.error is None, self.error


def libvirt_state(rt, server: str, name: str) -> int | None:
    conn = connect(server_uri(rt, server))
    try:
        return conn.lookupByName(name).state()[0]
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


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
    # Deleted, its lease left the DHCP server's hosts file too.
    assert mac not in (rt.config.dhcp_dir / f"{net.name}.hosts").read_text()


def test_a_mac_without_a_lease_gets_no_address(cluster, celery_app):
    rt, name = cluster, unique("nol")
    ask = "udhcpc -i eth0 -n -q -t 3 -T 1 -s /bin/true >/dev/null 2>&1; echo DHCP-EXIT-$((1+0))=$?"
    try:
        mac, ip = install_on_vm_network(rt, celery_app, name, "cs1")
        assert boot_line(server_uri(rt, "cs1"), name) == (name, ip)
        # While the lease exists, asking again gets an address...
        assert on_console(rt, "cs1", name, ask, r"DHCP-EXIT-1=(\d+)").group(1) == "0"
        with transaction(rt.sessions) as session:
            ipam.release(session, session.scalar(select(VirtualMachine.id).where(VirtualMachine.name == name)))
        with rt.sessions() as session:
            assert publish_leases(session, rt.config, SUBNET) is True  # dnsmasq was told
        # ...once it is gone from the network DB, the same MAC gets nothing.
        assert on_console(rt, "cs1", name, ask, r"DHCP-EXIT-1=(\d+)").group(1) == "1"
        net = next(n for n in build(rt.config).vm_networks if n.subnet == SUBNET)
        log = rt.config.dhcp_dir / f"{net.name}.log"
        refusal = re.compile(rf"DHCPDISCOVER\({net.bridge}\) {mac} no address available")
        wait_until(lambda: refusal.search(log.read_text()), 10, f"dnsmasq to log that {mac} has no address")
    finally:
        run_job(rt, celery_app, "delete-vm", {"vm": name})


def test_a_tcp_connection_to_the_guest_survives_its_live_migration(cluster, celery_app):
    rt, name = cluster, unique("nmg")
    try:
        _mac, ip = install_on_vm_network(rt, celery_app, name, "cs1")
        boot_line(server_uri(rt, "cs1"), name)
        start_echo_service(rt, "cs1", name)
        with connect_to(ip) as sock:
            stream = EchoStream(sock)
            stream.start()
            try:
                stream.more_replies(20, "echoes before the migration")
                before = stream.replies
                moved = run_job(rt, celery_app, "migrate", {"vm": name, "to": "cs2"}, timeout=MIGRATE_TIMEOUT)
                during = stream.replies - before
                stream.more_replies(20, "echoes after the migration")
            finally:
                stream.stopping.set()
                stream.join(60)
        assert moved.state == SUCCEEDED, moved.error_message
        assert libvirt_state(rt, "cs2", name) == libvirt.VIR_DOMAIN_RUNNING and libvirt_state(rt, "cs1", name) is None
        assert during > 0 and stream.error is None, stream.error
        print(f"longest gap {stream.longest_gap * 1000:.0f} ms, libvirt downtime {moved.result['downtime_ms']} ms")
    finally:
        run_job(rt, celery_app, "delete-vm", {"vm": name})
