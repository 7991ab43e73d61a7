"""The network DB: subnets, and leases (MAC, IP, hostname) made in the same transaction as their VM."""

import ipaddress
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from errors import InvalidInput, NoAddress, SubnetExists, UnknownSubnet
from models import Lease, Subnet, VirtualMachine

MAC_PREFIXES = {"qemu": "52:54:00", "kvm": "52:54:00", "xen": "00:16:3e"}
MAC_ATTEMPTS = 64


def create_subnet(session: Session, *, name: str, cidr: str, gateway: str | None, dns: list[str],
                  range_start: str, range_end: str, mac_prefix: str = "52:54:00") -> Subnet:
    """Validate and add a subnet; its lease range and gateway must lie inside the CIDR."""
    network = _network(cidr)
    start, end = _inside(network, range_start, "range_start"), _inside(network, range_end, "range_end")
    if start > end:
        raise InvalidInput(f"range_start {start} is after range_end {end}", field="range_start")
    if gateway is not None:
        _inside(network, gateway, "gateway")
    for server in dns:
        _address(server, "dns")
    _check_mac_prefix(mac_prefix)
    if session.scalar(select(Subnet.id).where(Subnet.name == name)) is not None:
        raise SubnetExists(f"subnet {name} exists", name=name)
    subnet = Subnet(name=name, cidr=str(network), gateway=gateway, dns=dns, range_start=str(start),
                    range_end=str(end), mac_prefix=mac_prefix.lower())
    session.add(subnet)
    session.flush()
    return subnet


def find_subnet(session: Session, name: str) -> Subnet:
    subnet = session.scalar(select(Subnet).where(Subnet.name == name))
    if subnet is None:
        raise UnknownSubnet(f"no subnet {name}", field="subnet", name=name)
    return subnet


def allocate_lease(session: Session, subnet: Subnet, vm: VirtualMachine) -> Lease:
    """Lease the lowest free address of the subnet's range and a fresh MAC to `vm`; NoAddress if full.

    The subnet's row is locked first (until the caller commits), so concurrent installs take their
    addresses one after another and never pick the same one (PostgreSQL runs them truly in parallel;
    SQLite's single writer already does). Uniqueness of (subnet, ip) and mac is enforced by the DB too.
    """
    session.execute(select(Subnet.id).where(Subnet.id == subnet.id).with_for_update())
    used = set(session.scalars(select(Lease.ip).where(Lease.subnet_id == subnet.id)))
    start, end = ipaddress.ip_address(subnet.range_start), ipaddress.ip_address(subnet.range_end)
    free = next((str(ip) for ip in _addresses(start, end) if str(ip) not in used), None)
    if free is None:
        raise NoAddress(f"subnet {subnet.name} has no free address in {start}-{end}", subnet=subnet.name)
    lease = Lease(subnet_id=subnet.id, vm_id=vm.id, ip=free, mac=_fresh_mac(session, subnet.mac_prefix), hostname=vm.name)
    session.add(lease)
    session.flush()
    return lease


def release(session: Session, vm_id: int) -> int:
    """Give back every lease of a VM; return how many."""
    leases = session.scalars(select(Lease).where(Lease.vm_id == vm_id)).all()
    for lease in leases:
        session.delete(lease)
    # Leases have no ORM relationship to their VM, so flush now: a VM deleted next must not go first.
    session.flush()
    return len(leases)


def hosts_file(session: Session, subnet: Subnet, fmt: str = "dnsmasq") -> str:
    """The subnet's leases as a dnsmasq `dhcp-hostsfile` or ISC dhcpd host declarations."""
    leases = session.scalars(select(Lease).where(Lease.subnet_id == subnet.id).order_by(Lease.ip)).all()
    if fmt == "dnsmasq":
        return "".join(f"{lease.mac},{lease.ip},{lease.hostname}\n" for lease in leases)
    if fmt == "isc":
        return "".join(
            f"host {lease.hostname} {{ hardware ethernet {lease.mac}; fixed-address {lease.ip}; }}\n" for lease in leases
        )
    raise InvalidInput(f"unknown hosts file format {fmt!r} (dnsmasq or isc)", field="format")


def _addresses(start: ipaddress.IPv4Address, end: ipaddress.IPv4Address):
    current = start
    while current <= end:
        yield current
        current += 1


def _fresh_mac(session: Session, prefix: str) -> str:
    for _ in range(MAC_ATTEMPTS):
        mac = f"{prefix}:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        if session.scalar(select(Lease.id).where(Lease.mac == mac)) is None:
            return mac
    raise NoAddress(f"no free MAC address under prefix {prefix}")


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError as error:
        raise InvalidInput(f"invalid cidr {cidr!r}: {error}", field="cidr") from None


def _address(text: str, field: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidInput(f"invalid address {text!r}", field=field) from None


def _inside(network, text: str, field: str):
    address = _address(text, field)
    if address not in network:
        raise InvalidInput(f"{field} {address} is outside {network}", field=field)
    return address


def _check_mac_prefix(prefix: str) -> None:
    octets = prefix.split(":")
    if len(octets) != 3 or not all(len(o) == 2 and all(c in "0123456789abcdefABCDEF" for c in o) for o in octets):
        raise InvalidInput(f"invalid MAC prefix {prefix!r}: three hex octets like 52:54:00", field="mac_prefix")
