"""Hosts as network namespaces: bridges in the root namespace, veths into each host's namespace."""

from __future__ import annotations

from lab.topology import Host, Network, VmLink, VmNetwork
from workers.command import output, run


def netns_names() -> set[str]:
    """Names of every network namespace `ip netns` knows."""
    return {line.split()[0] for line in output(["ip", "netns", "list"]).splitlines() if line.strip()}


def link_exists(name: str, netns: str | None = None) -> bool:
    return run(_ip(netns) + ["link", "show", "dev", name], check=False).returncode == 0


def ensure_bridge(net: Network | VmNetwork) -> None:
    """Make the network's bridge exist, carry its address and be up; harmless if it already does."""
    if not link_exists(net.bridge):
        run(["ip", "link", "add", net.bridge, "type", "bridge"])
    run(["ip", "addr", "replace", str(net.bridge_address), "dev", net.bridge])
    run(["ip", "link", "set", net.bridge, "up"])


def ensure_host(host: Host, networks: dict[str, Network]) -> None:
    """Make the host's namespace exist with lo up and one addressed veth per network; harmless if it already does."""
    if host.netns not in netns_names():
        run(["ip", "netns", "add", host.netns])
    run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
    for link in host.links:
        if not link_exists(link.veth):
            # A half-made pair from a crash may have left the inner end behind.
            if link_exists(link.inner, host.netns):
                run(["ip", "-n", host.netns, "link", "del", link.inner])
            run(["ip", "link", "add", link.veth, "type", "veth", "peer", "name", link.inner, "netns", host.netns])
        run(["ip", "link", "set", link.veth, "master", networks[link.network].bridge, "up"])
        run(["ip", "-n", host.netns, "addr", "replace", str(link.address), "dev", link.inner])
        run(["ip", "-n", host.netns, "link", "set", link.inner, "up"])


def ensure_vm_link(host: Host, link: VmLink, root_bridge: str) -> None:
    """Give the host its bridge for a VM network and join it to the network's bridge in the root namespace
    through a veth pair (no addresses: guests speak through it); harmless if it already is."""
    inside = ["ip", "-n", host.netns]
    if not link_exists(link.server_bridge, host.netns):
        run(inside + ["link", "add", link.server_bridge, "type", "bridge"])
    run(inside + ["link", "set", link.server_bridge, "up"])
    if not link_exists(link.veth):
        if link_exists(link.inner, host.netns):
            run(inside + ["link", "del", link.inner])
        run(["ip", "link", "add", link.veth, "type", "veth", "peer", "name", link.inner, "netns", host.netns])
    run(["ip", "link", "set", link.veth, "master", root_bridge, "up"])
    run(inside + ["link", "set", link.inner, "master", link.server_bridge, "up"])


def netns_pids(netns: str) -> list[int]:
    """PIDs of every process living in `netns` (none if it does not exist)."""
    proc = run(["ip", "netns", "pids", netns], check=False)
    return [int(pid) for pid in proc.stdout.decode().split()] if proc.returncode == 0 else []


def delete_netns(netns: str) -> None:
    if netns in netns_names():
        run(["ip", "netns", "del", netns])


def delete_link(name: str) -> None:
    """Delete link `name` if it exists; harmless if the kernel removes it meanwhile (a veth whose namespace just went)."""
    if run(["ip", "link", "del", name], check=False).returncode != 0 and link_exists(name):
        run(["ip", "link", "del", name])


def _ip(netns: str | None) -> list[str]:
    return ["ip", "-n", netns] if netns else ["ip"]
