"""Which hypervisor kind a cluster server really offers: `xen` when its libvirt driver is Xen, `kvm` only
when a tiny KVM guest actually runs there, else `qemu` (TCG, no acceleration).

libvirt lists KVM wherever /dev/kvm exists, also on a host that is itself a VM without nested
virtualisation, where KVM guests hang or abort. So the list is no evidence: a transient probe domain
(no disk, no network, only firmware) must show that its vCPU executed instructions. The firmware fills
the real-mode interrupt vector table at guest physical address 0 first thing; a guest whose table is
still all zeros within the deadline never ran.
"""

import secrets
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass

import libvirt

from errors import ServerUnreachable
from workers.node.domain_xml import DomainSpec, Hypervisor, domain_xml
from workers.node.host import connect

PROBE_PREFIX = "laxcluster-kvm-probe-"
PROBE_TIMEOUT_S = 15.0
# How long libvirt gets to start the probe guest (QEMU's start-up, not the guest's), and to give up
# a start once the probe is destroyed.
START_GRACE_S = 30.0
POLL_S = 0.2
PROBE_MEMORY_BYTES = 32 << 20
IVT_BYTES = 1024


@dataclass(frozen=True)
class Detected:
    """A server's hypervisor kind and why we believe it, in words an operator can check."""

    kind: Hypervisor
    evidence: str


def detect(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> Detected:
    """The hypervisor kind of the server behind `uri`; starts (and always removes) a probe domain when
    libvirt offers KVM. Takes at most about `timeout_s` beyond libvirt's own start-up of the probe."""
    conn = connect(uri)
    try:
        if conn.getType() == "Xen":
            return Detected("xen", "libvirt's driver is Xen")
        if not offers_kvm(conn):
            return Detected("qemu", "libvirt offers no kvm domains")
        ran, seen = guest_runs(conn, "kvm", timeout_s)
        return Detected("kvm" if ran else "qemu", f"kvm probe: {seen}")
    except libvirt.libvirtError as error:
        raise ServerUnreachable(f"libvirt at {uri} failed: {error.get_error_message()}", uri=uri) from None
    finally:
        conn.close()


def offers_kvm(conn: libvirt.virConnect) -> bool:
    """Whether libvirt's domain capabilities list kvm for the host's architecture."""
    try:
        conn.getDomainCapabilities(None, None, None, "kvm")
    except libvirt.libvirtError:
        return False
    return True


def guest_runs(conn: libvirt.virConnect, kind: Hypervisor, timeout_s: float) -> tuple[bool, str]:
    """Start a probe domain of type `kind` and watch whether its firmware runs; (ran, what was seen).

    Start and watch run in a thread: a QEMU that hangs while KVM sets up can hold libvirt's call
    without end, and only destroying the probe releases it. The probe is destroyed whatever happens,
    and so are leftovers of an earlier probe whose worker died."""
    remove_probes(conn)
    spec = DomainSpec(name=PROBE_PREFIX + secrets.token_hex(4), uuid=str(uuidlib.uuid4()),
                      memory_bytes=PROBE_MEMORY_BYTES, vcpus=1, hypervisor=kind, disks=())
    outcome: list[tuple[bool, str]] = []
    watcher = threading.Thread(target=lambda: outcome.append(_start_and_watch(conn, spec, timeout_s)),
                               name="hypervisor-probe", daemon=True)
    watcher.start()
    try:
        watcher.join(timeout_s + START_GRACE_S)
        return outcome[0] if outcome else (False, f"libvirt did not start and run the guest within "
                                                  f"{timeout_s + START_GRACE_S:.0f} s")
    finally:
        remove_probes(conn)
        if watcher.is_alive():
            # The destroy ends a start libvirt was still in; a probe it registers only now goes too.
            watcher.join(START_GRACE_S)
            remove_probes(conn)


def _start_and_watch(conn: libvirt.virConnect, spec: DomainSpec, timeout_s: float) -> tuple[bool, str]:
    try:
        domain = conn.createXML(domain_xml(spec), 0)
    except libvirt.libvirtError as error:
        return False, f"libvirt could not start a {spec.hypervisor} guest: {error.get_error_message()}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not domain.isActive():
                return False, "the guest stopped by itself"
            if any(domain.memoryPeek(0, IVT_BYTES, libvirt.VIR_MEMORY_PHYSICAL)):
                return True, "the guest's firmware ran (it wrote its interrupt table)"
        except libvirt.libvirtError as error:
            return False, f"the guest could not be watched: {error.get_error_message()}"
        if time.monotonic() >= deadline:
            return False, f"the guest's firmware wrote nothing in {timeout_s:.0f} s (its vCPU does not run)"
        time.sleep(POLL_S)


def remove_probes(conn: libvirt.virConnect) -> None:
    """Destroy every probe domain on this server (they are transient: destroyed is gone)."""
    for domain in conn.listAllDomains():
        if domain.name().startswith(PROBE_PREFIX):
            try:
                domain.destroy()
            except libvirt.libvirtError:
                # It ended between the listing and the destroy: gone either way.
                pass
