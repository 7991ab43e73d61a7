"""Facts about a cluster server, read through libvirt-python."""

import socket
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import libvirt

from errors import ServerUnreachable

LIBVIRT_TCP_PORT = 16509


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    cpu_count: int
    cpu_model: str
    cpu_mhz: int
    memory_total_bytes: int
    memory_free_bytes: int
    hypervisor_type: str
    hypervisor_version: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def answers_tcp(uri: str, timeout: float = 2.0) -> bool:
    """Whether a `qemu+tcp` URI's libvirtd accepts a TCP connection within `timeout` (libvirt's own connect to
    an address nobody answers at waits much longer); other transports are not probed and count as answering."""
    parts = urlsplit(uri)
    if not parts.scheme.endswith("+tcp"):
        return True
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or LIBVIRT_TCP_PORT), timeout=timeout).close()
    except OSError:
        return False
    return True


def connect(uri: str) -> libvirt.virConnect:
    """Open a libvirt connection, turning libvirt's error into ServerUnreachable."""
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as error:
        raise ServerUnreachable(f"cannot reach libvirt at {uri}: {error.get_error_message()}", uri=uri) from None


def read_facts(uri: str) -> HostFacts:
    """CPU, memory and hypervisor facts of the server behind `uri`."""
    conn = connect(uri)
    try:
        _arch, _memory_mib, cpus, mhz, *_ = conn.getInfo()
        memory = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
        return HostFacts(
            hostname=conn.getHostname(),
            cpu_count=cpus,
            cpu_model=_cpu_model(conn.getCapabilities()),
            cpu_mhz=mhz,
            memory_total_bytes=memory["total"] * 1024,
            memory_free_bytes=memory["free"] * 1024,
            hypervisor_type=conn.getType(),
            hypervisor_version=_version(conn.getVersion()),
        )
    except libvirt.libvirtError as error:
        raise ServerUnreachable(f"libvirt at {uri} failed: {error.get_error_message()}", uri=uri) from None
    finally:
        conn.close()


def _cpu_model(capabilities_xml: str) -> str:
    model = ET.fromstring(capabilities_xml).find("./host/cpu/model")
    return model.text if model is not None and model.text else "unknown"


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def answers(uri: str) -> bool:
    """Whether the libvirtd behind `uri` accepts a connection now."""
    try:
        libvirt.open(uri).close()
        return True
    except libvirt.libvirtError:
        return False
