"""Domains on one cluster server through libvirt-python: define, start, stop, undefine, state.

Every call is idempotent where a workflow step needs it (undefining a missing domain, destroying a
stopped one, defining the same XML again), so a job re-run after a crash converges.
"""

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import libvirt

from errors import ConsoleTimeout, DomainFailed, DomainNotFound, ShutdownTimedOut
from workers.node.console import SerialConsole, start_event_loop
from workers.node.host import connect

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
POLL_S = 0.2
ACPI_RESEND_S = 3.0


@dataclass(frozen=True)
class DomainState:
    name: str
    uuid: str
    state: str
    domain_id: int | None
    cpu_time_ns: int
    memory_bytes: int
    vcpus: int


@contextmanager
def session(uri: str) -> Iterator[libvirt.virConnect]:
    conn = connect(uri)
    try:
        yield conn
    finally:
        conn.close()


def lookup(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain | None:
    """The domain with this UUID: by UUID, not name, so a same-named domain we did not define is never touched."""
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise DomainFailed(f"libvirt: {error.get_error_message()}") from None


def require(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain:
    domain = lookup(conn, uuid)
    if domain is None:
        raise DomainNotFound(f"no domain with UUID {uuid} on {conn.getHostname()}", domain=uuid)
    return domain


def state_of(domain: libvirt.virDomain) -> DomainState:
    code, max_kib, _kib, vcpus, cpu_time = domain.info()
    domain_id = domain.ID()
    return DomainState(domain.name(), domain.UUIDString(), STATE_NAMES.get(code, "unknown"), domain_id if domain_id >= 0 else None,
                       cpu_time, max_kib * 1024, vcpus)


def define(uri: str, xml: str) -> None:
    """Define (or redefine) a persistent domain from `xml`."""
    with session(uri) as conn:
        _call(conn.defineXML, xml)


def start(uri: str, uuid: str) -> DomainState:
    """Start a defined domain; already running is fine."""
    with session(uri) as conn:
        domain = require(conn, uuid)
        if not domain.isActive():
            _call(domain.create)
        return state_of(domain)


def destroy(uri: str, uuid: str) -> None:
    """Power a domain off at once; a missing or stopped domain is fine."""
    with session(uri) as conn:
        domain = lookup(conn, uuid)
        if domain is not None and domain.isActive():
            _call(domain.destroy)


def shutdown(uri: str, uuid: str, timeout: float) -> DomainState:
    """Ask the guest to power off (ACPI) and wait up to `timeout` seconds until it has.

    The request is sent again every ACPI_RESEND_S: a guest still booting has no ACPI handler yet
    and drops the first one (Nova re-sends for the same reason)."""
    with session(uri) as conn:
        domain = require(conn, uuid)
        deadline = time.monotonic() + timeout
        next_request = time.monotonic()
        while domain.isActive():
            now = time.monotonic()
            if now > deadline:
                raise ShutdownTimedOut(f"{domain.name()} did not power off within {timeout:.0f} s; destroy forces it off",
                                       domain=domain.name())
            if now >= next_request:
                _request_shutdown(domain)
                next_request = now + ACPI_RESEND_S
            time.sleep(POLL_S)
        return state_of(domain)


def _request_shutdown(domain: libvirt.virDomain) -> None:
    """Press the guest's ACPI power button; a guest that powered off meanwhile is fine."""
    try:
        domain.shutdown()
    except libvirt.libvirtError as error:
        if domain.isActive():
            raise DomainFailed(f"libvirt: {error.get_error_message()}") from None


def reboot(uri: str, uuid: str) -> DomainState:
    """Reset a running domain (a hardware reset, which every guest obeys)."""
    with session(uri) as conn:
        domain = require(conn, uuid)
        _call(domain.reset, 0)
        return state_of(domain)


def undefine(uri: str, uuid: str) -> None:
    """Stop and remove a domain's definition; a missing domain is fine."""
    with session(uri) as conn:
        domain = lookup(conn, uuid)
        if domain is None:
            return
        if domain.isActive():
            _call(domain.destroy)
        _call(domain.undefine)


def vnc_display(uri: str, uuid: str) -> tuple[str, int, str] | None:
    """(address, port, password) of the running domain's VNC display as libvirt set it up, or None without one."""
    with session(uri) as conn:
        domain = require(conn, uuid)
        graphics = ET.fromstring(_call(domain.XMLDesc, libvirt.VIR_DOMAIN_XML_SECURE)).find("devices/graphics[@type='vnc']")
    if graphics is None or int(graphics.get("port", "-1")) <= 0:
        return None
    listen = graphics.find("listen")
    address = listen.get("address") if listen is not None else graphics.get("listen")
    return address or "127.0.0.1", int(graphics.get("port")), graphics.get("passwd", "")


def states(uri: str) -> list[DomainState]:
    """Every domain this server knows, running or defined."""
    with session(uri) as conn:
        return [state_of(domain) for domain in conn.listAllDomains()]


def domain_state(uri: str, uuid: str) -> DomainState | None:
    with session(uri) as conn:
        domain = lookup(conn, uuid)
        return None if domain is None else state_of(domain)


def _call(method, *args):
    try:
        return method(*args)
    except libvirt.libvirtError as error:
        raise DomainFailed(f"libvirt: {error.get_error_message()}") from None


def came_up(uri: str, uuid: str, probe: dict[str, str] | None, timeout: float, grace: float = 30.0) -> tuple[bool, str]:
    """Whether the guest of domain `uuid` came up, and how we know.

    With a console `probe` ({"send": text, "expect": regex}) the guest must answer it within
    `timeout`; without one, the domain must still be running after `grace` seconds.
    """
    start_event_loop()
    with session(uri) as conn:
        domain = require(conn, uuid)
        if probe is None:
            deadline = time.monotonic() + min(grace, timeout)
            while time.monotonic() < deadline:
                if not domain.isActive():
                    return False, "the domain stopped"
                time.sleep(POLL_S)
            return True, f"still running after {min(grace, timeout):.0f} s (no console probe for its template)"
        return _answers_probe(domain, probe, timeout)


def _answers_probe(domain: libvirt.virDomain, probe: dict[str, str], timeout: float) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    with SerialConsole(domain) as console:
        while time.monotonic() < deadline:
            if not domain.isActive():
                return False, "the domain stopped"
            console.write(probe["send"].encode())
            try:
                return True, console.read_until(probe["expect"], timeout=3).group(0)
            except ConsoleTimeout:
                continue
    return False, f"no answer matching {probe['expect']!r} on the console within {timeout:.0f} s"


def listing(uri: str) -> list[dict[str, str]]:
    """Every domain this server knows, by UUID, with its name and state (what `laxcluster check` compares)."""
    with session(uri) as conn:
        return [{"uuid": domain.UUIDString(), "name": domain.name(), "state": STATE_NAMES.get(domain.state()[0], "unknown")}
                for domain in conn.listAllDomains()]


def undefine_inactive(uri: str, uuid: str) -> bool:
    """Undefine the domain with `uuid` if it is not running; False (nothing done) while it runs. A missing
    domain counts as done."""
    with session(uri) as conn:
        try:
            domain = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return True
            raise DomainFailed(f"libvirt: {error.get_error_message()}") from None
        if domain.isActive():
            return False
        _call(domain.undefine)
        return True


DETACH_TIMEOUT_S = 30.0


def has_disk(domain: libvirt.virDomain, dev: str, flags: int = 0) -> bool:
    """Whether the domain's (live, or with VIR_DOMAIN_XML_INACTIVE its persistent) definition has disk `dev`."""
    xml = _call(domain.XMLDesc, flags)
    return f"<target dev='{dev}'" in xml or f'<target dev="{dev}"' in xml


def attach_disk(uri: str, uuid: str, disk_xml: str, dev: str) -> str:
    """Add a disk to a domain's definition and hot-plug it into the domain if it runs and takes it. Returns
    "live" (plugged in now) or "config" (the guest sees it from its next start); a disk already there is kept."""
    with session(uri) as conn:
        domain = require(conn, uuid)
        live = bool(domain.isActive())
        if live and not has_disk(domain, dev):
            live = _hot_plug(domain, disk_xml)
        if not has_disk(domain, dev, libvirt.VIR_DOMAIN_XML_INACTIVE):
            _call(domain.attachDeviceFlags, disk_xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        return "live" if live else "config"


def _hot_plug(domain: libvirt.virDomain, disk_xml: str) -> bool:
    """Plug the disk into the running domain; False when libvirt or the hypervisor refuses (no hot-plug there)."""
    try:
        domain.attachDeviceFlags(disk_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError:
        return False
    return True


def detach_disk(uri: str, uuid: str, disk_xml: str, dev: str, timeout: float = DETACH_TIMEOUT_S) -> str:
    """Remove a disk from a domain (live and definition) and wait until the guest let go of it; a missing domain
    or disk is fine. Returns "live", "config" or "absent"."""
    with session(uri) as conn:
        domain = lookup(conn, uuid)
        if domain is None:
            return "absent"
        live = bool(domain.isActive())
        if has_disk(domain, dev, libvirt.VIR_DOMAIN_XML_INACTIVE):
            _call(domain.detachDeviceFlags, disk_xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if not live or not has_disk(domain, dev):
            return "live" if live else "config"
        _call(domain.detachDeviceFlags, disk_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        deadline = time.monotonic() + timeout
        while domain.isActive() and has_disk(domain, dev):
            if time.monotonic() > deadline:
                raise DomainFailed(f"the guest of {domain.name()} did not release disk {dev} within {timeout:.0f} s")
            time.sleep(POLL_S)
        return "live"
