"""Moving a domain between two cluster servers through libvirt-python: pre-flight checks, live
peer-to-peer migration with progress and abort, offline moves of a defined but stopped domain,
and settling where a domain runs after a migration that failed half-way.

Storage is shared (iSCSI LUNs on the SAN), so only memory and the definition move.
"""

import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

import libvirt

from errors import DomainFailed, DomainNotFound, MigrationAborted, MigrationFailed, ServerUnreachable, SplitBrain
from workers.node.console import start_event_loop
from workers.node.domains import lookup, session
from workers.node.host import connect

# Between libvirt's iteration events, how often the job's stats are sampled while memory moves: an idle
# guest's whole transfer takes 0.1-0.3 s on TCG, which a coarser tick would miss entirely.
POLL_S = 0.1
# After abortJob, how long QEMU gets to stop the transfer and give the source back.
ABORT_GRACE_S = 60.0
MIGRATE_FLAGS = libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
# QEMU before 9.0 loses guest writes in a live migration under TCG (no KVM): its dirty-bitmap sync does not
# re-arm TCG's write tracking, so a page the guest writes after it was sent is never sent again and the guest
# resumes on the destination with stale memory (fixed by QEMU commit 03bfc2188f, "physmem: Fix migration
# dirty bitmap coherency with TCG memory access"). In the lab one live migration in 12 to 50 ended in a
# guest kernel panic (list corruption). Such a guest is moved paused, as `live=False` does.
FIRST_QEMU_LIVE_SAFE_UNDER_TCG = 9_000_000  # QEMU 9.0.0 as libvirt numbers versions
PAUSED_UNDER_OLD_TCG = ("moved paused: QEMU before 9.0 can lose guest memory in a live migration under TCG "
                        "(no KVM)")


@dataclass(frozen=True)
class Problem:
    """One reason a migration cannot go ahead, with a sentence saying what to do about it."""

    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Room:
    """What the destination can still take (from placement) beside what the VM needs."""

    free_memory_bytes: int
    free_vcpus: int
    memory_bytes: int
    vcpus: int


@dataclass(frozen=True)
class MigrationProgress:
    """One sample of the running migration job (libvirt's job stats)."""

    elapsed_ms: int
    memory_total: int
    memory_remaining: int
    memory_processed: int
    iteration: int
    dirty_rate: int

    @property
    def percent(self) -> float:
        if not self.memory_total:
            return 0.0
        return 100.0 * (self.memory_total - self.memory_remaining) / self.memory_total


@dataclass(frozen=True)
class MigrationResult:
    """How the move went: `started_at` (epoch seconds) is when libvirt was asked, `migration_ms` how long
    it took, `downtime_ms` how long the guest was paused (libvirt's figure; None for an offline move);
    `paused_because` says why a move asked to be live was not."""

    live: bool
    started_at: float
    migration_ms: int
    downtime_ms: int | None
    memory_total: int | None
    iterations: int | None
    paused_because: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def preflight(source_uri: str, dest_uri: str, name: str, uuid: str, *, dest_name: str, dest_maintenance: bool,
              room: Room) -> list[Problem]:
    """Every reason moving domain `name` from `source_uri` to `dest_uri` would fail; empty when it can go."""
    problems = []
    if dest_maintenance:
        problems.append(Problem("ServerInMaintenance",
                                f"{dest_name} is in maintenance: activate it (laxcluster server activate {dest_name}) "
                                "or choose another server"))
    if room.memory_bytes > room.free_memory_bytes:
        problems.append(Problem("NotEnoughMemory",
                                f"{dest_name} has {room.free_memory_bytes // 2**20} MiB free for VMs, {name} needs "
                                f"{room.memory_bytes // 2**20} MiB: free memory there or choose another server"))
    if room.vcpus > room.free_vcpus:
        problems.append(Problem("NotEnoughVcpus",
                                f"{dest_name} can take {room.free_vcpus} more vCPUs, {name} has {room.vcpus}: "
                                "choose another server"))
    try:
        with session(source_uri) as source, session(dest_uri) as dest:
            problems += _compare_servers(source, dest, name, uuid, dest_name)
    except ServerUnreachable as error:
        problems.append(Problem("ServerUnreachable", f"{error.message}: start its libvirtd or choose another server"))
    return problems


def _compare_servers(source: libvirt.virConnect, dest: libvirt.virConnect, name: str, uuid: str,
                     dest_name: str) -> list[Problem]:
    problems = []
    if lookup(source, uuid) is None:
        problems.append(Problem("DomainNotFound", f"{name} is not defined on its server {source.getHostname()}: "
                                                  "the inventory is out of date, refresh the VM's state"))
    if lookup(dest, uuid) is not None:
        problems.append(Problem("DomainExists", f"{dest_name} already has a domain of {name} (UUID {uuid}): "
                                                "remove the stale definition there first"))
    if source.getType() != dest.getType():
        problems.append(Problem("HypervisorMismatch", f"{dest_name} runs {dest.getType()}, the VM's server runs "
                                                      f"{source.getType()}: migrate between servers of one kind"))
    if not cpu_compatible(source, dest):
        problems.append(Problem("CpuIncompatible", f"{dest_name}'s CPU lacks features of the VM's server CPU: "
                                                   "choose a server with the same CPU model"))
    return problems


def cpu_compatible(source: libvirt.virConnect, dest: libvirt.virConnect) -> bool:
    """Whether the destination's CPU offers everything the source host's CPU does (libvirt compareCPU)."""
    cpu = ET.fromstring(source.getCapabilities()).find("./host/cpu")
    if cpu is None:
        return True
    try:
        verdict = dest.compareCPU(ET.tostring(cpu, encoding="unicode"), 0)
    except libvirt.libvirtError:
        # An architecture libvirt cannot compare (no CPU map): nothing to go by, as libvirt itself would.
        return True
    return verdict != libvirt.VIR_CPU_COMPARE_INCOMPATIBLE


def live_loses_memory(domain_type: str | None, hypervisor_version: int) -> bool:
    """Whether a live migration can leave a domain of libvirt type `domain_type` with stale memory on a
    hypervisor of libvirt version `hypervisor_version` (QEMU's: TCG before 9.0)."""
    return domain_type == "qemu" and hypervisor_version < FIRST_QEMU_LIVE_SAFE_UNDER_TCG


def safe_to_move_live(conn: libvirt.virConnect, domain: libvirt.virDomain) -> bool:
    """Whether `domain`, running on `conn`'s hypervisor, keeps its memory intact through a live migration."""
    return not live_loses_memory(ET.fromstring(domain.XMLDesc()).get("type"), conn.getVersion())


def migration_flags(conn: libvirt.virConnect, domain: libvirt.virDomain, live: bool) -> tuple[int, str | None]:
    """libvirt's flags for moving running `domain` off `conn`'s server, live if asked and safe, and why a
    move asked to be live is made paused (None when it is not)."""
    paused_because = PAUSED_UNDER_OLD_TCG if live and not safe_to_move_live(conn, domain) else None
    moves_live = live and paused_because is None
    return MIGRATE_FLAGS | (libvirt.VIR_MIGRATE_LIVE if moves_live else 0), paused_because


def migration_uri(dest_uri: str) -> str | None:
    """Where QEMU sends memory: the destination's management address (None for a local URI)."""
    host = urlparse(dest_uri).hostname
    return f"tcp://{host}" if host else None


def migrate(source_uri: str, dest_uri: str, uuid: str, dest_xml: str, *, live: bool,
            on_progress: Callable[[MigrationProgress], None], should_abort: Callable[[], bool],
            bandwidth_mib_s: int | None = None) -> MigrationResult:
    """Move domain `uuid` from source to destination, defined there from `dest_xml` and undefined at the source.

    A running domain moves peer-to-peer (live unless `live` is false, or live migration would corrupt
    its memory on this hypervisor: see FIRST_QEMU_LIVE_SAFE_UNDER_TCG); `on_progress` gets the job
    stats at each of libvirt's iteration events and every POLL_S while memory moves, and the
    destination's figures once it has ended; when `should_abort()` turns true the libvirt job is
    aborted, the domain keeps running on the source and MigrationAborted is raised. A stopped domain
    moves offline: defined on the destination, undefined on the source.

    `migration_ms` is how long the `migrateToURI3` call took, as a caller of libvirt alone would time
    it; opening the connection and building the XML before, asking the destination for the downtime after, count as
    our overhead, not as migration time.
    """
    # Before the connection opens: only connections opened afterwards deliver the iteration events.
    start_event_loop()
    with session(source_uri) as source:
        domain = lookup(source, uuid)
        if domain is None:
            raise DomainNotFound(f"no domain with UUID {uuid} on {source.getHostname()}", domain=uuid)
        if not domain.isActive():
            started, started_at = time.monotonic(), time.time()
            move_definition(source, dest_uri, uuid, dest_xml)
            return MigrationResult(False, started_at, _ms_since(started), None, None, None)
        flags, paused_because = migration_flags(source, domain, live)
        live = bool(flags & libvirt.VIR_MIGRATE_LIVE)
        params = _params(domain, dest_uri, dest_xml, bandwidth_mib_s)
        wake = threading.Event()
        callback = source.domainEventRegisterAny(domain, libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION,
                                                 lambda *_: wake.set(), None)
        try:
            outcome = _run_in_thread(lambda: domain.migrateToURI3(dest_uri, params, flags), wake)
            _watch(domain, outcome, wake, on_progress, should_abort)
        finally:
            source.domainEventDeregisterAny(callback)
    with session(dest_uri) as dest:
        final = completed_stats(dest, uuid)
    if final.progress is not None:
        on_progress(final.progress)
    return MigrationResult(live, outcome.started_at, outcome.call_ms, final.downtime_ms,
                           final.progress.memory_total if final.progress else None,
                           final.progress.iteration if final.progress else None, paused_because)


def move_definition(source: libvirt.virConnect, dest_uri: str, uuid: str, dest_xml: str) -> None:
    """Offline move: define on the destination first, so a failure in between leaves a definition somewhere."""
    with session(dest_uri) as dest:
        try:
            dest.defineXML(dest_xml)
        except libvirt.libvirtError as error:
            raise MigrationFailed(f"defining domain {uuid} on the destination failed: {error.get_error_message()}") from None
    domain = lookup(source, uuid)
    if domain is not None:
        domain.undefine()


def _params(domain: libvirt.virDomain, dest_uri: str, dest_xml: str, bandwidth_mib_s: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: running_xml_for_destination(domain, dest_xml),
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: dest_xml,
    }
    if uri := migration_uri(dest_uri):
        params[libvirt.VIR_MIGRATE_PARAM_URI] = uri
    if bandwidth_mib_s:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib_s
    return params


def running_xml_for_destination(domain: libvirt.virDomain, dest_xml: str) -> str:
    """The running domain's migratable XML (with its VNC password) with each iSCSI disk logging in as the
    destination's initiator, each bridged NIC on the destination's bridge and its VNC display on the
    destination's address.

    The running XML (not `dest_xml`) keeps the device addresses libvirt assigned at start, which
    the destination must reproduce exactly; only initiator and bridge names change with the server.
    """
    wanted_xml = ET.fromstring(dest_xml)
    wanted = {disk.find("./target").get("dev"): disk.find("./source/initiator")
              for disk in wanted_xml.findall("./devices/disk")}
    live = ET.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE))
    _use_destination_bridges(live, wanted_xml)
    _use_destination_display(live, wanted_xml)
    for disk in live.findall("./devices/disk"):
        source, initiator = disk.find("./source"), wanted.get(disk.find("./target").get("dev"))
        if source is None or initiator is None:
            continue
        for old in source.findall("./initiator"):
            source.remove(old)
        source.append(initiator)
    return ET.tostring(live, encoding="unicode")


def _use_destination_bridges(live: ET.Element, wanted: ET.Element) -> None:
    bridges = {nic.find("./mac").get("address"): nic.find("./source").get("bridge")
               for nic in wanted.findall("./devices/interface[@type='bridge']")}
    for nic in live.findall("./devices/interface[@type='bridge']"):
        bridge = bridges.get(nic.find("./mac").get("address"))
        if bridge is not None:
            nic.find("./source").set("bridge", bridge)


def _use_destination_display(live: ET.Element, wanted: ET.Element) -> None:
    listen = wanted.find("./devices/graphics[@type='vnc']/listen")
    if listen is None:
        return
    for graphics in live.findall("./devices/graphics[@type='vnc']"):
        if graphics.get("listen") is not None:
            graphics.set("listen", listen.get("address"))
        for address in graphics.findall("./listen[@type='address']"):
            address.set("address", listen.get("address"))


def _run_in_thread(call: Callable[[], object], wake: threading.Event) -> "Outcome":
    """Run the blocking migration call in a thread, timed around the call alone; `wake` is set when it ends."""
    outcome = Outcome()

    def run() -> None:
        outcome.started_at = time.time()
        started = time.monotonic()
        try:
            call()
        except libvirt.libvirtError as error:
            outcome.error = error.get_error_message()
        finally:
            outcome.call_ms = _ms_since(started)
            outcome.done.set()
            wake.set()

    threading.Thread(target=run, name="migrate", daemon=True).start()
    return outcome


class Outcome:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: str | None = None
        self.started_at = 0.0
        self.call_ms = 0


def _watch(domain: libvirt.virDomain, outcome: Outcome, wake: threading.Event,
           on_progress: Callable[[MigrationProgress], None], should_abort: Callable[[], bool]) -> None:
    """Sample the job on each iteration event and every POLL_S until the migration thread ends (which
    wakes this at once); abort it when asked."""
    aborted, seen, moving = False, False, True
    while not outcome.done.is_set():
        wake.wait(POLL_S)
        wake.clear()
        if outcome.done.is_set():
            break
        if moving:
            sample = job_progress(domain)
            if sample is not None:
                seen = True
                on_progress(sample)
            # Once the source is paused for the switch-over it has no job stats (libvirt answers with an
            # error each time): what remains is the guest resuming on the destination and libvirt stopping
            # the source, with no bytes to report, so stop asking.
            moving = sample is not None or not seen
        if not aborted and should_abort():
            aborted = True
            _abort(domain)
    if aborted:
        if not outcome.done.wait(ABORT_GRACE_S):
            raise MigrationFailed(f"{domain.name()}: the migration did not stop within {ABORT_GRACE_S:.0f} s of abort")
        raise MigrationAborted(f"migration of {domain.name()} cancelled; it keeps running on its server")
    if outcome.error is not None:
        raise MigrationFailed(f"migration of {domain.name()} failed: {outcome.error}")


def _abort(domain: libvirt.virDomain) -> None:
    try:
        domain.abortJob()
    except libvirt.libvirtError:
        # The job ended on its own between the sample and the abort; the outcome says how.
        pass


def job_progress(domain: libvirt.virDomain) -> MigrationProgress | None:
    """The running migration's job stats, or None while no job is active."""
    try:
        stats = domain.jobStats()
    except libvirt.libvirtError:
        return None
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    return _progress(stats)


def _progress(stats: dict[str, Any]) -> MigrationProgress:
    return MigrationProgress(
        elapsed_ms=stats.get(libvirt.VIR_DOMAIN_JOB_TIME_ELAPSED, 0),
        memory_total=stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_TOTAL, 0),
        memory_remaining=stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_REMAINING, 0),
        memory_processed=stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_PROCESSED, 0),
        iteration=stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_ITERATION, 0),
        dirty_rate=stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_DIRTY_RATE, 0),
    )


@dataclass(frozen=True)
class Completed:
    """What the destination's libvirt recorded of the migration that brought a domain there."""

    downtime_ms: int | None
    progress: MigrationProgress | None


def completed_stats(dest: libvirt.virConnect, uuid: str) -> Completed:
    """The downtime libvirt measured and the memory moved, for the migration that just brought domain
    `uuid` to `dest` (the final figures even when the transfer ended before the first sample)."""
    domain = lookup(dest, uuid)
    if domain is None:
        return Completed(None, None)
    try:
        stats = domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        return Completed(None, None)
    moved = _progress(stats) if stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_TOTAL) else None
    return Completed(stats.get(libvirt.VIR_DOMAIN_JOB_DOWNTIME), moved)


# -- after a failure: where does it run? --------------------------------------------------------------

@dataclass(frozen=True)
class Seen:
    """What one server's libvirt says of the domain; `reachable` false means nothing is known."""

    reachable: bool
    defined: bool = False
    state: int | None = None

    @property
    def running(self) -> bool:
        return self.state == libvirt.VIR_DOMAIN_RUNNING

    @property
    def active(self) -> bool:
        return self.state not in (None, libvirt.VIR_DOMAIN_SHUTOFF)


def look(uri: str, uuid: str) -> Seen:
    try:
        conn = connect(uri)
    except ServerUnreachable:
        return Seen(False)
    try:
        domain = lookup(conn, uuid)
        return Seen(True, domain is not None, None if domain is None else domain.state()[0])
    except (libvirt.libvirtError, DomainFailed):
        return Seen(False)
    finally:
        conn.close()


def settle(source_uri: str, dest_uri: str, uuid: str) -> str:
    """Leave domain `uuid` running (or defined) on exactly one of the two servers; return "source" or "dest".

    After a migration ends, however it ended: a copy running on one side wins and the other side's
    leftover (a paused incoming guest, a stale definition) is removed; a source left paused is resumed.
    SplitBrain when both run, MigrationFailed when neither server can be asked.
    """
    source, dest = look(source_uri, uuid), look(dest_uri, uuid)
    if source.running and dest.running:
        raise SplitBrain(f"domain {uuid} runs on both servers: stop one copy by hand", domain=uuid)
    if dest.running or (dest.defined and source.reachable and not source.defined):
        _remove(source_uri, uuid)
        return "dest"
    if source.active or source.defined:
        _remove(dest_uri, uuid)
        if source.state == libvirt.VIR_DOMAIN_PAUSED and not dest.reachable:
            # Unknown destination: the paused source may be the only copy left, but we cannot prove it.
            raise MigrationFailed(f"domain {uuid} is paused on its server and the destination cannot be asked", domain=uuid)
        _resume(source_uri, uuid)
        return "source"
    if dest.defined:
        return "dest"
    raise MigrationFailed(f"domain {uuid} was found on neither server (source reachable: {source.reachable}, "
                          f"destination reachable: {dest.reachable})", domain=uuid)


def _remove(uri: str, uuid: str) -> None:
    """Destroy and undefine a leftover copy; an unreachable server keeps it (its libvirtd drops an
    unfinished incoming guest itself when it comes back)."""
    try:
        conn = connect(uri)
    except ServerUnreachable:
        return
    try:
        domain = lookup(conn, uuid)
        if domain is None:
            return
        if domain.isActive():
            domain.destroy()
        if domain.isPersistent():
            domain.undefine()
    finally:
        conn.close()


def _resume(uri: str, uuid: str) -> None:
    with session(uri) as conn:
        domain = lookup(conn, uuid)
        if domain is not None and domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            domain.resume()


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
