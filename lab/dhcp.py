"""A dnsmasq per DHCP-served VM network, in the root namespace, bound to that network's bridge only.

It answers only MACs in its hosts file (`--dhcp-range=<net>,static`: no lease, no address), which the
control side rewrites from the network DB when leases change (workers/net/dhcp.py) and reloads with
SIGHUP, releasing what it gave back (`dhcp_release`). No DNS (`--port=0`). Its files live in the config's
`dhcp_dir`, where that writer finds them.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from errors import LabError
from lab import processes
from lab.topology import VmNetwork
from workers.net.dhcp import host_entries, hosts_path, pid_path, running_dnsmasq

START_TIMEOUT_S = 10


@dataclass(frozen=True)
class DhcpServer:
    network: VmNetwork
    directory: Path

    @property
    def pidfile(self) -> Path:
        return pid_path(self.directory, self.network.name)

    @property
    def hosts_file(self) -> Path:
        return hosts_path(self.directory, self.network.name)

    @property
    def leases_file(self) -> Path:
        return self.directory / f"{self.network.name}.leases"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.network.name}.log"

    def argv(self) -> list[str]:
        net = self.network
        return [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            f"--interface={net.bridge}", "--bind-interfaces", "--except-interface=lo",
            f"--dhcp-range={net.cidr.network_address},static,{net.cidr.netmask}",
            f"--dhcp-option=option:router,{net.bridge_address.ip}", "--dhcp-authoritative", "--no-ping",
            f"--dhcp-hostsfile={self.hosts_file}", f"--dhcp-leasefile={self.leases_file}",
            f"--pid-file={self.pidfile}", f"--log-facility={self.log}", "--log-dhcp",
            # Its files sit in directories private to root (a test's var_dir): keep root to re-read them.
            "--user=root", "--group=root",
        ]


def running_pid(server: DhcpServer) -> int | None:
    """The network's dnsmasq if it runs: by its pidfile, else by its argv (the pidfile may be gone)."""
    pid = running_dnsmasq(server.pidfile)
    if pid is not None:
        return pid
    found = processes.find("dnsmasq", f"--pid-file={server.pidfile}")
    return found[0] if found else None


def start(server: DhcpServer) -> int:
    """Start the network's dnsmasq unless it runs (an empty hosts file if there is none yet); return its PID."""
    pid = running_pid(server)
    if pid is not None:
        return pid
    server.directory.mkdir(parents=True, exist_ok=True)
    if not server.hosts_file.exists():
        server.hosts_file.write_text("")
    forget_stale_leases(server)
    proc = subprocess.Popen(server.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    processes.wait_until(lambda: running_dnsmasq(server.pidfile) == proc.pid or proc.poll() is not None,
                         START_TIMEOUT_S, f"dnsmasq of {server.network.name}")
    if proc.poll() is not None:
        raise LabError(f"dnsmasq of {server.network.name} exited with {proc.returncode}; see {server.log}")
    return proc.pid


def forget_stale_leases(server: DhcpServer) -> None:
    """Drop leases the hosts file no longer has from dnsmasq's lease file (given back while it was down):
    read at start, they would keep their addresses from the VMs the network DB now gives them to."""
    if not server.leases_file.exists():
        return
    wanted = host_entries(server.hosts_file.read_text())
    lines = server.leases_file.read_text().splitlines(keepends=True)
    # A lease line: expiry MAC IP hostname client-id.
    server.leases_file.write_text("".join(line for line in lines if tuple(line.split()[1:3]) in wanted))


def stop_all(directory: Path, networks: list[VmNetwork]) -> None:
    """Stop the dnsmasq of each of `networks`, and any other whose pidfile is in `directory` (networks of
    an older config), found by pidfile or argv; remove their pidfiles."""
    pidfiles = {*(directory.glob("*.pid") if directory.exists() else ()), *(pid_path(directory, n.name) for n in networks)}
    pids = {pid for pidfile in pidfiles if (pid := running_dnsmasq(pidfile)) is not None}
    pids |= {pid for pidfile in pidfiles for pid in processes.find("dnsmasq", f"--pid-file={pidfile}")}
    processes.stop(pids)
    for pidfile in pidfiles:
        pidfile.unlink(missing_ok=True)
