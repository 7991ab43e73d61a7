"""NoCloud seed disks: how a fresh VM learns its hostname, address, DNS servers and SSH keys.

The seed is the standard cloud-init NoCloud volume: a small VFAT image labelled CIDATA
holding `meta-data`, `user-data` (#cloud-config) and `network-config` (version 1), built
without mounting (mkfs.vfat from dosfstools, mcopy from mtools). Standard cloud images
configure themselves from it; the lab's tiny template reads the same files. It is written on
the SAN, straight into the VM's seed volume (`write_seed`).
"""

import ipaddress
import json
import os
import re
import tempfile
from pathlib import Path

from errors import InvalidInput
from workers.command import run
from workers.san.backend import VolumeBackend
from workers.san.images import write_image

LABEL = "CIDATA"
SIZE_KIB = 1024
HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# An OpenSSH public key line: type, base64 blob, optional comment; no quotes or control characters.
SSH_KEY = re.compile(r"(ssh|ecdsa|sk)-[a-zA-Z0-9@.-]+ [A-Za-z0-9+/=]+( [^\"\\\x00-\x1f\x7f]*)?")


def make_seed(
    path: Path,
    *,
    hostname: str,
    mac: str | None,
    ip_cidr: str | None,
    gateway: str | None,
    ssh_keys: list[str],
    dns: list[str] = (),
) -> Path:
    """Write a NoCloud seed image to `path` (replacing it atomically) and return `path`.

    `mac` selects the interface the address goes to; `ip_cidr` ("10.0.0.5/24") makes it
    static (with the subnet's `dns` servers), without it the interface asks DHCP. Raises InvalidInput for a
    malformed value.
    """
    path = Path(path)
    files = {
        "meta-data": meta_data(hostname),
        "user-data": user_data(hostname, ssh_keys),
        "network-config": network_config(mac, ip_cidr, gateway, dns),
    }
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    try:
        run(["mkfs.vfat", "-n", LABEL, "-C", str(partial), str(SIZE_KIB)])
        with tempfile.TemporaryDirectory() as staging:
            sources = []
            for name, text in files.items():
                source = Path(staging) / name
                source.write_text(text)
                sources.append(str(source))
            run(["mcopy", "-i", str(partial), *sources, "::"])
        partial.chmod(0o644)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_seed(backend: VolumeBackend, name: str, *, hostname: str, mac: str | None, ip_cidr: str | None,
               gateway: str | None, ssh_keys: list[str], dns: list[str] = ()) -> str:
    """Build the seed image (as `make_seed`) in a scratch directory and write it into volume `name`; return its handle."""
    with tempfile.TemporaryDirectory() as scratch:
        image = make_seed(Path(scratch) / "seed.img", hostname=hostname, mac=mac, ip_cidr=ip_cidr, gateway=gateway,
                          ssh_keys=ssh_keys, dns=dns)
        return write_image(backend, name, image, "raw")


def meta_data(hostname: str) -> str:
    if not HOSTNAME.fullmatch(hostname):
        raise InvalidInput(f"hostname {hostname!r} is not [a-z0-9-], at most 63 characters", field="hostname")
    return f"instance-id: {hostname}\nlocal-hostname: {hostname}\n"


def user_data(hostname: str, ssh_keys: list[str]) -> str:
    for key in ssh_keys:
        if not SSH_KEY.fullmatch(key.strip()):
            raise InvalidInput(f"not an OpenSSH public key: {key[:40]!r}", field="ssh_keys")
    # JSON strings are valid YAML scalars, so quoting with json.dumps is safe for any key comment.
    lines = ["#cloud-config", f"hostname: {hostname}", "disable_root: false"]
    if ssh_keys:
        lines.append("ssh_authorized_keys:")
        lines += [f"  - {json.dumps(key.strip())}" for key in ssh_keys]
    return "\n".join(lines) + "\n"


def network_config(mac: str | None, ip_cidr: str | None, gateway: str | None, dns: list[str] = ()) -> str:
    lines = ["version: 1", "config:", "  - type: physical", "    name: eth0"]
    if mac is not None:
        if not MAC.fullmatch(mac.lower()):
            raise InvalidInput(f"MAC address {mac!r} is not of the form 52:54:00:12:34:56", field="mac")
        lines.append(f'    mac_address: "{mac.lower()}"')
    lines.append("    subnets:")
    if ip_cidr is None:
        lines.append("      - type: dhcp")
        return "\n".join(lines) + "\n"
    try:
        interface = ipaddress.ip_interface(ip_cidr)
        router = ipaddress.ip_address(gateway) if gateway is not None else None
        servers = [str(ipaddress.ip_address(server)) for server in dns]
    except ValueError as exc:
        raise InvalidInput(str(exc), field="ip_cidr") from exc
    if "/" not in ip_cidr:
        raise InvalidInput(f"address {ip_cidr!r} needs a prefix length, e.g. 10.0.0.5/24", field="ip_cidr")
    lines += ["      - type: static", f"        address: {interface.with_prefixlen}"]
    if router is not None:
        lines.append(f"        gateway: {router}")
    if servers:
        lines.append(f"        dns_nameservers: [{', '.join(servers)}]")
    return "\n".join(lines) + "\n"
