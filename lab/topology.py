"""The lab's shape, computed from the config alone: networks, hosts, and every name the lab makes.

Nothing here touches the machine, so `up`, `down` and `status` (and tests) agree on the names of
bridges, namespaces and veths without asking the kernel. Every name starts with the `[lab]`
prefix, so two labs (a test run and `make run`) can coexist and `down` touches only its own.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from config import Config, ServerConfig, SiteConfig, VmNetworkConfig
from errors import InvalidInput

IFNAME_MAX = 15  # the kernel's limit on interface names (IFNAMSIZ - 1)
ISCSI_PORT = 3260
TGT_CONTROL_PORT_MAX = 32767  # tgtd refuses a larger -C


@dataclass(frozen=True)
class Network:
    """One lab network: a bridge in the root namespace carrying `bridge_address`."""

    name: str
    cidr: ipaddress.IPv4Network
    bridge: str
    bridge_address: ipaddress.IPv4Interface


@dataclass(frozen=True)
class Link:
    """A veth from the root namespace (`veth`, enslaved to the bridge) into a host (`inner`)."""

    network: str
    veth: str
    inner: str
    address: ipaddress.IPv4Interface


@dataclass(frozen=True)
class VmNetwork:
    """A VM network: bridge `bridge` in the root namespace carrying the subnet's gateway (`bridge_address`),
    so the root namespace reaches the guests; served by a dnsmasq on that bridge when `dhcp`."""

    name: str
    cidr: ipaddress.IPv4Network
    bridge: str
    bridge_address: ipaddress.IPv4Interface
    subnet: str
    dhcp: bool


@dataclass(frozen=True)
class VmLink:
    """A server's way onto a VM network: its own bridge `server_bridge` (the one libvirt attaches guests
    to), joined by a veth (`inner` inside, `veth` in the root namespace) to the network's bridge."""

    network: str
    veth: str
    inner: str
    server_bridge: str


@dataclass(frozen=True)
class Host:
    """A lab host: a network namespace with one link per network it has an address on."""

    name: str
    kind: str  # "server", "san" or "backup"
    site: str
    netns: str
    links: tuple[Link, ...]
    vm_links: tuple[VmLink, ...] = ()

    def address(self, network: str) -> str:
        """The host's plain IP address on `network`; KeyError if it has none there."""
        for link in self.links:
            if link.network == network:
                return str(link.address.ip)
        raise KeyError(f"{self.name} has no address on network {network}")

    @property
    def addresses(self) -> dict[str, str]:
        return {link.network: str(link.address.ip) for link in self.links}


@dataclass(frozen=True)
class Topology:
    prefix: str
    lab_dir: Path
    networks: tuple[Network, ...]
    hosts: tuple[Host, ...]
    vm_networks: tuple[VmNetwork, ...] = ()

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"no lab host named {name}")

    def servers(self) -> list[Host]:
        return [h for h in self.hosts if h.kind == "server"]

    def sans(self) -> list[Host]:
        return [h for h in self.hosts if h.kind == "san"]

    def backup_hosts(self) -> list[Host]:
        return [h for h in self.hosts if h.kind == "backup"]


def build(cfg: Config) -> Topology:
    """Compute the lab from `cfg`; raise InvalidInput if a name would be too long or an address is off-net."""
    lab = cfg.section("lab")
    prefix = lab.get("prefix", "lx")
    networks = tuple(_network(prefix, name, raw) for name, raw in lab.get("networks", {}).items())
    vm_networks = _vm_networks(cfg, prefix)
    hosts = [
        _host(prefix, networks, site.name, "san", san.name, san.addresses) for site, san in cfg.sans()
    ] + [
        replace(_host(prefix, networks, site.name, "server", server.name, server.addresses),
                vm_links=_vm_links(prefix, vm_networks, site, server))
        for site, _cluster, server in cfg.servers()
    ] + [
        _host(prefix, networks, raw["site"], "backup", raw["name"], raw["addresses"]) for raw in cfg.raw.get("backup_hosts", [])
    ]
    return Topology(prefix=prefix, lab_dir=lab_dir(cfg), networks=networks, hosts=tuple(hosts), vm_networks=vm_networks)


def lab_dir(cfg: Config) -> Path:
    """Absolute directory holding the lab's state, images and per-host daemon directories."""
    return (cfg.var_dir / "lab").resolve()


def server_uri(cfg: Config, name: str) -> str:
    """The libvirt URI of cluster server `name`, as the config gives it."""
    for _site, _cluster, server in cfg.servers():
        if server.name == name:
            return server.uri
    raise KeyError(f"no cluster server named {name}")


def tgt_control_port(cfg: Config, san_name: str) -> int:
    """The tgtd control port (`tgtadm -C N`) of SAN `san_name`, as its config entry gives it.

    The SAN worker reaches the same tgtd through the same setting, so the lab insists on one.
    """
    _site, san = cfg.san(san_name)
    port = san.tgt_control_port
    if port is None or not 0 <= port <= TGT_CONTROL_PORT_MAX:
        raise InvalidInput(f"lab SAN {san_name} needs tgt_control_port in 0..{TGT_CONTROL_PORT_MAX}, not {port}")
    return port


def san_portal(cfg: Config, san_name: str) -> tuple[str, int]:
    """The (address, port) of SAN `san_name`'s iSCSI portal."""
    portal = cfg.san(san_name)[1].portal
    address, colon, port = portal.rpartition(":")
    return (address, int(port)) if colon else (portal, ISCSI_PORT)


def host_uuid(prefix: str, server: str) -> str:
    """A stable libvirt host UUID, distinct per lab and server (libvirt refuses to migrate between equal ones)."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{server}.{prefix}.lab.laxcluster"))


def _network(prefix: str, name: str, raw: dict) -> Network:
    cidr = ipaddress.IPv4Network(raw["cidr"])
    address = ipaddress.IPv4Address(raw["bridge_address"])
    _check_in(address, cidr, f"bridge address of network {name}")
    return Network(
        name=name,
        cidr=cidr,
        bridge=_ifname(f"{prefix}-{name}"),
        bridge_address=ipaddress.IPv4Interface(f"{address}/{cidr.prefixlen}"),
    )


def _host(prefix: str, networks: tuple[Network, ...], site: str, kind: str, name: str, addresses: dict[str, str]) -> Host:
    known = {net.name for net in networks}
    unknown = set(addresses) - known
    if unknown:
        raise InvalidInput(f"host {name} has addresses on unknown networks {sorted(unknown)}")
    links = []
    # The veth's index is the network's position in the config, so names never depend on a host's own subset.
    for index, net in enumerate(networks):
        if net.name not in addresses:
            continue
        address = ipaddress.IPv4Address(addresses[net.name])
        _check_in(address, net.cidr, f"{name}'s {net.name} address")
        links.append(
            Link(
                network=net.name,
                veth=_ifname(f"{prefix}{name}{index}"),
                inner=_ifname(net.name),
                address=ipaddress.IPv4Interface(f"{address}/{net.cidr.prefixlen}"),
            )
        )
    return Host(name=name, kind=kind, site=site, netns=f"{prefix}-{name}", links=tuple(links))


def _vm_networks(cfg: Config, prefix: str) -> tuple[VmNetwork, ...]:
    """One segment per VM network name; a name at two sites is one stretched segment only if each says so."""
    declared: dict[str, list[VmNetworkConfig]] = {}
    for site in cfg.sites:
        for net in site.vm_networks:
            declared.setdefault(net.name, []).append(net)
    subnets = {raw["name"]: raw for raw in cfg.raw.get("subnets", [])}
    found = []
    for name, nets in declared.items():
        if len(nets) > 1 and not all(net.stretched for net in nets):
            raise InvalidInput(f"VM network {name} is declared at several sites: mark each `stretched = true` to join them")
        if len({net.subnet for net in nets}) > 1:
            raise InvalidInput(f"VM network {name} is one segment: every site must give it the same subnet")
        raw = subnets.get(nets[0].subnet)
        if raw is None or not raw.get("gateway"):
            raise InvalidInput(f"VM network {name} needs its subnet {nets[0].subnet} in [[subnets]], with a gateway")
        cidr = ipaddress.IPv4Network(raw["cidr"])
        gateway = ipaddress.IPv4Address(raw["gateway"])
        _check_in(gateway, cidr, f"gateway of subnet {nets[0].subnet}")
        found.append(VmNetwork(name=name, cidr=cidr, bridge=_ifname(f"{prefix}-{name}"),
                               bridge_address=ipaddress.IPv4Interface(f"{gateway}/{cidr.prefixlen}"),
                               subnet=nets[0].subnet, dhcp=any(net.dhcp for net in nets)))
    return tuple(found)


def _vm_links(prefix: str, vm_networks: tuple[VmNetwork, ...], site: SiteConfig, server: ServerConfig) -> tuple[VmLink, ...]:
    ours = {net.name for net in site.vm_networks}
    links = []
    for index, net in enumerate(vm_networks):
        bridge = server.vm_bridges.get(net.name)
        if bridge is None:
            continue
        if net.name not in ours:
            raise InvalidInput(f"server {server.name} bridges VM network {net.name}, which {site.name} does not have")
        if bridge == net.name:
            raise InvalidInput(f"server {server.name}'s bridge for {net.name} needs a name other than the network's")
        links.append(VmLink(network=net.name, veth=_ifname(f"{prefix}{server.name}v{index}"), inner=_ifname(net.name),
                            server_bridge=_ifname(bridge)))
    unknown = set(server.vm_bridges) - {net.name for net in vm_networks}
    if unknown:
        raise InvalidInput(f"server {server.name} bridges unknown VM networks {sorted(unknown)}")
    return tuple(links)


def _ifname(name: str) -> str:
    if len(name) > IFNAME_MAX:
        raise InvalidInput(f"interface name {name!r} is longer than {IFNAME_MAX} characters; use a shorter lab prefix or host name")
    return name


def _check_in(address: ipaddress.IPv4Address, cidr: ipaddress.IPv4Network, what: str) -> None:
    if address not in cidr:
        raise InvalidInput(f"{what} {address} is outside {cidr}")
