"""Which hypervisor kind a cluster server really offers: `xen` when its libvirt driver is Xen, `kvm` only
when a tiny KVM guest actually runs there, else `qemu` (TCG, no acceleration).

libvirt lists KVM wherever /dev/kvm exists, also on a host that is itself a VM without nested
virtualisation, where KVM guests hang. So the list is no evidence: a transient probe domain (no disk,
no network) boots the server's own kernel and must print the kernel's banner on its serial console.
The firmware and the kernel's real-mode start are no evidence either: on such a host they run, and
the guest hangs once the kernel proper starts.
"""

import os
import re
import secrets
import threading
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

import libvirt

from errors import ConsoleClosed, ConsoleTimeout, ServerUnreachable
from workers.node.console import SerialConsole, start_event_loop
from workers.node.domain_xml import DirectBoot, DomainSpec, Hypervisor, domain_xml
from workers.node.host import connect

PROBE_PREFIX = "laxcluster-kvm-probe-"
PROBE_TIMEOUT_S = 15.0
# How long libvirt gets to start the probe guest (QEMU's start-up, not the guest's), and to give up
# a start once the probe is destroyed.
START_GRACE_S = 30.0
PROBE_MEMORY_BYTES = 128 << 20
# The kernel's first line on the console, printed once it runs in 64-bit mode.
BANNER = "Linux version"


@dataclass(frozen=True)
class Detected:
    """A server's hypervisor kind and why we believe it, in words an operator can check."""

    kind: Hypervisor
    evidence: str


def detect(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> Detected:
    """The hypervisor kind of the server behind `uri`; starts (and always removes) a probe domain when
    libvirt offers KVM. Takes at most `timeout_s` plus twice START_GRACE_S."""
    start_event_loop()  # before the connection: the probe reads its guest's console through it
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


def host_kernel() -> Path | None:
    """A kernel for the probe guest: the one this server runs if /boot has it, else the newest there (the
    node worker runs on the server; any x86-64 Linux kernel prints the banner)."""
    running = Path("/boot") / f"vmlinuz-{os.uname().release}"
    installed = sorted(Path("/boot").glob("vmlinuz-*"))
    return running if running.exists() else (installed[-1] if installed else None)


def offers_kvm(conn: libvirt.virConnect) -> bool:
    """Whether libvirt's domain capabilities list kvm for the host's architecture."""
    try:
        conn.getDomainCapabilities(None, None, None, "kvm")
    except libvirt.libvirtError:
        return False
    return True


def guest_runs(conn: libvirt.virConnect, kind: Hypervisor, timeout_s: float) -> tuple[bool, str]:
    """Boot a probe domain of type `kind` on the server's kernel and watch for the kernel's banner on its
    console; (ran, what was seen). Needs start_event_loop() before `conn` was opened.

    Start and watch run in a thread: a QEMU that hangs while KVM sets up can hold libvirt's call
    without end, and only destroying the probe releases it. The probe is destroyed whatever happens,
    and so are leftovers of an earlier probe whose worker died."""
    kernel = host_kernel()
    if kernel is None:
        return False, "no kernel in /boot to boot a probe guest with"
    remove_probes(conn)
    spec = DomainSpec(name=PROBE_PREFIX + secrets.token_hex(4), uuid=str(uuidlib.uuid4()),
                      memory_bytes=PROBE_MEMORY_BYTES, vcpus=1, hypervisor=kind, disks=(),
                      boot=DirectBoot(kernel, None, "console=ttyS0"))
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
        # Paused until its console is open, so the banner cannot pass unread.
        domain = conn.createXML(domain_xml(spec), libvirt.VIR_DOMAIN_START_PAUSED)
        with SerialConsole(domain) as console:
            domain.resume()
            console.read_until(re.escape(BANNER), timeout_s)
            return True, "the guest's kernel started (it printed its banner)"
    except ConsoleTimeout as error:
        return False, f"the guest's kernel printed no banner in {timeout_s:.0f} s; its console last showed " \
                      f"{_last_line(error.extra['tail'])!r}"
    except ConsoleClosed:
        return False, "the guest stopped before its kernel printed its banner"
    except libvirt.libvirtError as error:
        return False, f"libvirt could not run a {spec.hypervisor} guest: {error.get_error_message()[:150]}"


def _last_line(tail: str) -> str:
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:80] if lines else ""


def remove_probes(conn: libvirt.virConnect) -> None:
    """Destroy every probe domain on this server (they are transient: destroyed is gone)."""
    for domain in conn.listAllDomains():
        if domain.name().startswith(PROBE_PREFIX):
            try:
                domain.destroy()
            except libvirt.libvirtError:
                # It ended between the listing and the destroy: gone either way.
                pass
