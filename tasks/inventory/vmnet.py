"""VM networks in the inventory: which network a VM's lease puts it on, which servers bridge that network
(the config's `vm_bridges`), and the DHCP hosts file each DHCP-served network gets from the network DB."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Config, VmNetworkConfig
from errors import NoVmNetwork
from models import ClusterServer, Lease, Subnet, VirtualMachine
from tasks.inventory import ipam
from workers.net import dhcp


def network_of(session: Session, config: Config, vm: VirtualMachine) -> VmNetworkConfig | None:
    """The VM network the VM's lease is on; None without a lease or for a subnet on no network."""
    subnet = session.scalar(select(Subnet.name).join(Lease, Lease.subnet_id == Subnet.id).where(Lease.vm_id == vm.id))
    return config.vm_network_of(subnet) if subnet else None


def bridge_for(config: Config, lease_subnet: str, server: str) -> str | None:
    """The bridge `server` attaches a NIC on `lease_subnet` to; None for a subnet on no VM network (user-mode
    NIC). NoVmNetwork when the subnet's network has no bridge on that server."""
    network = config.vm_network_of(lease_subnet)
    if network is None:
        return None
    bridge = config.vm_bridge(server, network.name)
    if bridge is None:
        raise NoVmNetwork(missing_bridge(server, network), server=server, network=network.name)
    return bridge


def missing_bridge(server: str, network: VmNetworkConfig) -> str:
    return (f"{server} has no bridge on VM network {network.name} (subnet {network.subnet}): give it one "
            f"(vm_bridges = {{ {network.name} = \"<bridge>\" }} in its config entry) or choose another server")


def on_network(session: Session, config: Config, vm: VirtualMachine,
               candidates: list[ClusterServer]) -> list[ClusterServer]:
    """The candidates that bridge the VM's network (all of them when it is on none); NoVmNetwork if none does."""
    network = network_of(session, config, vm)
    if network is None:
        return candidates
    bridged = [s for s in candidates if config.vm_bridge(s.name, network.name) is not None]
    if candidates and not bridged:
        names = ", ".join(sorted(s.name for s in candidates))
        raise NoVmNetwork(f"none of {names} has a bridge on VM network {network.name}, where {vm.name}'s subnet "
                          f"{network.subnet} lives: give one of them a bridge for it (vm_bridges in the config)",
                          network=network.name, servers=[s.name for s in candidates])
    return bridged


def leased_subnets(session: Session, vm_id: int) -> list[str]:
    """The names of the subnets the VM holds leases in."""
    query = select(Subnet.name).join(Lease, Lease.subnet_id == Subnet.id).where(Lease.vm_id == vm_id)
    return sorted(set(session.scalars(query)))


def publish_leases(session: Session, config: Config, subnet_name: str) -> bool:
    """Rewrite the DHCP hosts file of the network carrying `subnet_name` from the network DB (what
    `GET /subnets/<name>/hosts` serves) and reload its DHCP server. Call after the lease change committed.
    False when the subnet is on no DHCP-served network or no DHCP server runs."""
    network = config.vm_network_of(subnet_name)
    if network is None or not network.dhcp:
        return False
    text = ipam.hosts_file(session, ipam.find_subnet(session, subnet_name))
    return dhcp.publish_hosts(config.dhcp_dir, network.name, text)


def publish_all(session: Session, config: Config) -> None:
    """Rewrite every DHCP-served network's hosts file (at start: leases may have changed while it was down)."""
    for site in config.sites:
        for network in site.vm_networks:
            if network.dhcp and session.scalar(select(Subnet.id).where(Subnet.name == network.subnet)) is not None:
                publish_leases(session, config, network.subnet)
