"""Drift between the inventory and what the SANs and servers really hold: a pure comparison.

`compare(inventory, observed)` lists every difference as a Drift: an *orphan* (there, but no row owns
it), *missing* (a row names it, it is not there), *mismatched* (there, but not as the row says) or
*unreachable* (a SAN or server that could not be asked). Things are matched by what the rows keep --
volume and template backend handles, iSCSI target names and LUNs, backup snapshot handles, VM UUIDs
and servers, lease VM ids -- never by a name a user chose.

A drift is `safe` when `laxcluster check --repair` may fix it without a person deciding (deleting
something LaxCluster made and nothing refers to, re-exporting what the rows say, undefining a
stopped domain nobody owns, dropping a lease of a deleted VM); its `action` names that repair.
Everything that belongs to a job still running (or one that ended while the check looked) is
skipped as busy: a check races no workflow.
"""

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.inventory.vms import ACTIVE_STATES, MAINTENANCE, RESCUE

ORPHAN, MISSING, MISMATCHED, UNREACHABLE = "orphan", "missing", "mismatched", "unreachable"
# Names LaxCluster gives what it makes; anything else on a SAN was put there by someone else.
OUR_VOLUME_PREFIXES = ("vm-", "tpl-")
OUR_SNAPSHOT_PREFIXES = ("bk-",)
RUNNING_STATES = frozenset({"running", "blocked"})
REPAIR = "laxcluster check --repair"
DELETE_TARGET, RESTORE_EXPORTS, DELETE_SNAPSHOT, DELETE_VOLUME = (
    "delete-target", "restore-exports", "delete-snapshot", "delete-volume")
UNDEFINE_DOMAIN, DROP_LEASE = "undefine-domain", "drop-lease"
# Targets go before the volumes they export; exports are restored before anything is deleted under them.
SAN_ORDER = (DELETE_TARGET, RESTORE_EXPORTS, DELETE_SNAPSHOT, DELETE_VOLUME)


@dataclass(frozen=True)
class Drift:
    kind: str  # orphan | missing | mismatched | unreachable
    resource: str  # volume | snapshot | target | lun | acl | domain | lease | vm | san | server
    where: str  # the SAN or server, or "inventory"
    what: str  # handle, iqn, uuid or id
    detail: str
    repair: str  # the command (or what to do) that fixes it
    safe: bool = False
    action: str | None = None  # the repair `--repair` runs when safe

    def key(self) -> tuple[str, str, str, str]:
        return self.kind, self.resource, self.where, self.what

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- what the inventory says ------------------------------------------------------------------------

@dataclass(frozen=True)
class VolumeRow:
    san: str
    handle: str
    role: str
    target: str | None = None
    lun: int | None = None
    vm_uuid: str | None = None
    vm_name: str | None = None


@dataclass(frozen=True)
class TemplateRow:
    san: str
    handle: str
    name: str


@dataclass(frozen=True)
class VmRow:
    id: int
    uuid: str
    name: str
    server: str | None
    state: str


@dataclass(frozen=True)
class LeaseRow:
    id: int
    vm_id: int | None
    ip: str
    mac: str


@dataclass(frozen=True)
class AnchorRow:
    """The snapshot the newest backup of a volume into a store keeps on the SAN for the next differential."""

    san: str
    handle: str
    vm_name: str


@dataclass(frozen=True)
class Inventory:
    volumes: tuple[VolumeRow, ...] = ()
    templates: tuple[TemplateRow, ...] = ()
    vms: tuple[VmRow, ...] = ()
    leases: tuple[LeaseRow, ...] = ()
    snapshots: frozenset[tuple[str, str]] = frozenset()  # (san, handle) of every snapshot a backup or replication names
    # (san, volume) of each replica copy a SAN may hold besides its rows: a failed-over VM's stale copy at the old
    # primary, until failback ships over it
    replicas: frozenset[tuple[str, str]] = frozenset()
    anchors: tuple[AnchorRow, ...] = ()
    initiators: dict[str, tuple[str, ...]] = field(default_factory=dict)  # SAN -> who may log in to its targets
    iqn_prefix: str = ""
    server_uris: dict[str, str] = field(default_factory=dict)
    busy_vms: frozenset[str] = frozenset()  # UUIDs of VMs a job works on
    busy_template_sans: frozenset[str] = frozenset()  # SANs a template import runs on
    snapshots_busy: bool = False  # a backup, restore or prune runs


# -- what the SANs and servers say -------------------------------------------------------------------

@dataclass(frozen=True)
class TargetFacts:
    iqn: str
    luns: dict[int, str]
    initiators: tuple[str, ...] = ()
    sessions: int = 0


@dataclass(frozen=True)
class DomainFacts:
    uuid: str
    name: str
    state: str


@dataclass(frozen=True)
class SanFacts:
    volumes: dict[str, str]  # volume and snapshot handles -> backing path
    targets: tuple[TargetFacts, ...] = ()
    # The domains of the SAN host's own libvirt (VMs run there for maintenance); None with `host_error` if it
    # did not answer, or if the SAN has none.
    host_domains: tuple[DomainFacts, ...] | None = None
    host_error: str | None = None


@dataclass(frozen=True)
class Observed:
    sans: dict[str, SanFacts] = field(default_factory=dict)
    servers: dict[str, tuple[DomainFacts, ...]] = field(default_factory=dict)
    unreachable: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (san|server, why)


@dataclass(frozen=True)
class Comparison:
    drifts: list[Drift]
    busy: list[str]  # what was skipped because a job works on it


def compare(inventory: Inventory, observed: Observed) -> Comparison:
    """Every drift between `inventory` and `observed`, and what was skipped as busy."""
    busy: list[str] = []
    drifts = [Drift(UNREACHABLE, resource, name, name, why,
                    f"make the {resource}'s worker answer (and its daemons run), then laxcluster check again")
              for name, (resource, why) in sorted(observed.unreachable.items())]
    for san, facts in sorted(observed.sans.items()):
        drifts += _SanCheck(inventory, san, facts, busy).drifts()
    drifts += _domain_drifts(inventory, observed, busy)
    drifts += _vm_drifts(inventory)
    drifts += _lease_drifts(inventory)
    return Comparison(drifts, busy)


def _is_busy(inventory: Inventory, text: str | None) -> bool:
    """Whether `text` (a handle, an iqn) carries the UUID of a VM a job works on."""
    return text is not None and any(uuid in text for uuid in inventory.busy_vms)


class _SanCheck:
    """One SAN's volumes, snapshots and exports against the rows that live on it."""

    def __init__(self, inventory: Inventory, san: str, facts: SanFacts, busy: list[str]) -> None:
        self.inv, self.san, self.facts, self.busy = inventory, san, facts, busy
        self.rows = [row for row in inventory.volumes if row.san == san]
        self.targets = {target.iqn: target for target in facts.targets}
        self.exported_by = {path: target.iqn for target in facts.targets for path in target.luns.values()}
        in_maintenance = {vm.uuid for vm in inventory.vms if vm.state == MAINTENANCE}
        self.on_host = {row.vm_uuid for row in self.rows if row.role == "disk" and row.vm_uuid in in_maintenance}

    def drifts(self) -> list[Drift]:
        orphan_targets = list(self._orphan_targets())
        deletable = {drift.what for drift in orphan_targets if drift.safe}
        return [*self._missing_volumes(), *self._orphan_volumes(deletable), *self._snapshots(deletable),
                *self._expected_targets(), *orphan_targets, *self._host_domains()]

    def _skip(self, what: str, busy: bool) -> bool:
        if busy:
            self.busy.append(f"{self.san}: {what}")
        return busy

    def _row_busy(self, row: VolumeRow) -> bool:
        return row.role == "restoring" or (row.vm_uuid is not None and row.vm_uuid in self.inv.busy_vms)

    def _missing_volumes(self) -> Iterator[Drift]:
        for row in self.rows:
            if row.handle in self.facts.volumes or self._skip(row.handle, self._row_busy(row)):
                continue
            owner = f"VM {row.vm_name}'s {row.role}" if row.vm_name else f"volume row {row.handle}"
            fix = (f"restore it from a backup (laxcluster backup list; backup restore --in-place) or "
                   f"laxcluster vm delete {row.vm_name}") if row.vm_name else "restore it from a backup or delete its row"
            yield Drift(MISSING, "volume", self.san, row.handle, f"{owner} {row.handle} is not on {self.san}", fix)
        for template in self.inv.templates:
            if template.san == self.san and template.handle not in self.facts.volumes:
                yield Drift(MISSING, "volume", self.san, template.handle,
                            f"template {template.name}'s volume is not on {self.san}",
                            f"laxcluster template import {template.name} (from its image) again")

    def _orphan_volumes(self, deletable_targets: set[str]) -> Iterator[Drift]:
        owned = ({row.handle for row in self.rows} | {t.handle for t in self.inv.templates if t.san == self.san}
                 | {handle for san, handle in self.inv.replicas if san == self.san})
        for handle, path in sorted(self.facts.volumes.items()):
            if "@" in handle or handle in owned:
                continue
            importing = handle.startswith("tpl-") and self.san in self.inv.busy_template_sans
            if self._skip(handle, importing or _is_busy(self.inv, handle)):
                continue
            yield self._orphan("volume", handle, path, handle.startswith(OUR_VOLUME_PREFIXES), DELETE_VOLUME,
                               deletable_targets)

    def _snapshots(self, deletable_targets: set[str]) -> Iterator[Drift]:
        known = {handle for san, handle in self.inv.snapshots if san == self.san}
        for handle, path in sorted(self.facts.volumes.items()):
            if "@" not in handle or handle in known:
                continue
            if self._skip(handle, self.inv.snapshots_busy or _is_busy(self.inv, handle)):
                continue
            ours = handle.partition("@")[2].startswith(OUR_SNAPSHOT_PREFIXES)
            yield self._orphan("snapshot", handle, path, ours, DELETE_SNAPSHOT, deletable_targets)
        for anchor in self.inv.anchors:
            if anchor.san == self.san and anchor.handle not in self.facts.volumes and not self.inv.snapshots_busy:
                yield Drift(MISSING, "snapshot", self.san, anchor.handle,
                            f"the anchor of {anchor.vm_name}'s newest backup is gone: its next differential is a full backup",
                            f"laxcluster backup create {anchor.vm_name}")

    def _orphan(self, resource: str, handle: str, path: str, ours: bool, action: str,
                deletable_targets: set[str]) -> Drift:
        """An orphan volume or snapshot: safe to delete when LaxCluster made it and no target keeps
        exporting it (a target that is itself deleted first does not count)."""
        exporter = self.exported_by.get(path)
        safe = ours and (exporter is None or exporter in deletable_targets)
        why = (f"no row owns {resource} {handle}" + (f"; {exporter} exports it" if exporter else "")
               + ("" if ours else "; not named like anything LaxCluster makes"))
        fix = REPAIR if safe else f"find out who uses it; delete it on {self.san} by hand if nobody does"
        return Drift(ORPHAN, resource, self.san, handle, why, fix, safe, action if safe else None)

    def _expected_targets(self) -> Iterator[Drift]:
        wanted: dict[str, dict[int, VolumeRow]] = {}
        for row in self.rows:
            if row.target is not None and row.lun is not None:
                wanted.setdefault(row.target, {})[row.lun] = row
        # restore_exports re-exports every row of the SAN at once: it needs every volume they name.
        can_export = all(row.handle in self.facts.volumes for row in self.rows if row.target and not self._row_busy(row))
        for iqn, luns in sorted(wanted.items()):
            if self._skip(iqn, any(self._row_busy(row) for row in luns.values())):
                continue
            for drift in self._target_drifts(iqn, luns):
                yield _with_reexport(drift, can_export)

    def _target_drifts(self, iqn: str, luns: dict[int, VolumeRow]) -> Iterator[Drift]:
        target = self.targets.get(iqn)
        if target is None:
            yield Drift(MISSING, "target", self.san, iqn, f"{self.san}'s tgtd does not export {iqn}", "")
            return
        for lun, row in sorted(luns.items()):
            path, served = self.facts.volumes.get(row.handle), target.luns.get(lun)
            if path is None:
                continue  # the missing volume is its own drift
            if served is None:
                yield Drift(MISSING, "lun", self.san, f"{iqn} lun {lun}", f"LUN {lun} ({row.handle}) is not exported", "")
            elif served != path:
                yield Drift(MISMATCHED, "lun", self.san, f"{iqn} lun {lun}", f"LUN {lun} serves {served}, not {path}", "")
        for lun in sorted(set(target.luns) - set(luns)):
            yield Drift(ORPHAN, "lun", self.san, f"{iqn} lun {lun}", f"no volume row is LUN {lun} ({target.luns[lun]})", "")
        # A VM running on the SAN host has its targets locked.
        locked = any(row.vm_uuid in self.on_host for row in luns.values())
        wanted_acl = set() if locked else set(self.inv.initiators.get(self.san, ()))
        if set(target.initiators) != wanted_acl:
            absent, extra = sorted(wanted_acl - set(target.initiators)), sorted(set(target.initiators) - wanted_acl)
            yield Drift(MISMATCHED, "acl", self.san, iqn, f"ACL lacks {absent or 'nothing'}, has extra {extra or 'nothing'}", "")

    def _orphan_targets(self) -> Iterator[Drift]:
        owned = {row.target for row in self.rows if row.target}
        for iqn, target in sorted(self.targets.items()):
            if iqn in owned or self._skip(iqn, _is_busy(self.inv, iqn)):
                continue
            ours = bool(self.inv.iqn_prefix) and iqn.startswith(f"{self.inv.iqn_prefix}:")
            safe = ours and target.sessions == 0
            why = (f"no volume row is exported as {iqn}" + (f"; {target.sessions} initiator(s) logged in" if target.sessions else "")
                   + ("" if ours else "; not named like LaxCluster's targets"))
            fix = REPAIR if safe else "find the initiator using it (an orphan domain?); delete the target by hand when unused"
            yield Drift(ORPHAN, "target", self.san, iqn, why, fix, safe, DELETE_TARGET if safe else None)


    def _host_domains(self) -> Iterator[Drift]:
        """VMs in maintenance here must run on the SAN host; nothing else may have a domain there."""
        if self.facts.host_domains is None:
            if self.on_host and self.facts.host_error:
                yield Drift(UNREACHABLE, "san host", self.san, self.san, self.facts.host_error,
                            f"make {self.san}'s libvirtd answer, then laxcluster check again")
            return
        vms = {vm.uuid: vm for vm in self.inv.vms}
        found = {domain.uuid: domain for domain in self.facts.host_domains}
        for uuid in sorted(self.on_host - self.inv.busy_vms):
            state = found[uuid].state if uuid in found else "not defined"
            if state not in RUNNING_STATES:
                name = vms[uuid].name
                yield Drift(MISMATCHED, "domain", self.san, uuid,
                            f"VM {name} is in maintenance, its domain on the SAN host is {state}",
                            f"laxcluster vm destroy {name} (ends the maintenance)")
        for uuid, domain in sorted(found.items()):
            if uuid in self.on_host or self._skip(f"host domain {uuid}", uuid in self.inv.busy_vms):
                continue
            vm = vms.get(uuid)
            owner = f"VM {vm.name} ({vm.state})" if vm else "no VM row"
            yield Drift(ORPHAN if vm is None else MISMATCHED, "domain", self.san, uuid,
                        f"domain {domain.name} is {domain.state} on the SAN host; {owner} runs there",
                        f"find out what runs there; stop and undefine it on {self.san}'s libvirt (virsh destroy, "
                        "undefine)")


def _with_reexport(drift: Drift, can_export: bool) -> Drift:
    """An export drift is repaired by re-exporting the SAN's rows, when every volume they name is there."""
    if can_export:
        return Drift(drift.kind, drift.resource, drift.where, drift.what, drift.detail, REPAIR, True, RESTORE_EXPORTS)
    return Drift(drift.kind, drift.resource, drift.where, drift.what, drift.detail,
                 f"repair the missing volumes on {drift.where} first, then {REPAIR}")


def _domain_drifts(inventory: Inventory, observed: Observed, busy: list[str]) -> Iterator[Drift]:
    vms = {vm.uuid: vm for vm in inventory.vms}
    seen_on = {(server, domain.uuid) for server, domains in observed.servers.items() for domain in domains}
    for server, domains in sorted(observed.servers.items()):
        for domain in sorted(domains, key=lambda d: d.uuid):
            vm = vms.get(domain.uuid)
            if vm is not None and vm.uuid in inventory.busy_vms:
                busy.append(f"{server}: domain {domain.uuid} ({vm.name})")
            elif vm is None:
                yield _orphan_domain(inventory, server, domain)
            elif vm.server != server:
                yield _misplaced_domain(inventory, server, domain, vm, (vm.server, vm.uuid) in seen_on)
            elif vm.state == RESCUE:
                if domain.state not in RUNNING_STATES:
                    yield Drift(MISMATCHED, "domain", server, domain.uuid,
                                f"VM {vm.name}'s rescue system is {domain.state} in libvirt",
                                f"laxcluster vm rescue {vm.name} --end (puts its own domain back)")
            elif (vm.state in RUNNING_STATES) != (domain.state in RUNNING_STATES):
                fix = f"laxcluster vm start {vm.name}" if vm.state in RUNNING_STATES else f"laxcluster vm shutdown {vm.name}"
                yield Drift(MISMATCHED, "domain", server, domain.uuid,
                            f"VM {vm.name} is {vm.state} in the inventory, {domain.state} in libvirt",
                            f"{fix} (or wait for the reconciler's state sync)")
    for vm in inventory.vms:
        if vm.server in observed.servers and vm.uuid not in inventory.busy_vms and vm.state != "installing" \
                and not any(uuid == vm.uuid for _, uuid in seen_on):
            yield Drift(MISSING, "domain", vm.server, vm.uuid, f"VM {vm.name} has no domain on {vm.server}",
                        f"laxcluster vm start {vm.name} (defines it again from the inventory)")


def _orphan_domain(inventory: Inventory, server: str, domain: DomainFacts) -> Drift:
    uri = inventory.server_uris.get(server, "<uri>")
    if domain.state in ACTIVE_STATES:
        return Drift(ORPHAN, "domain", server, domain.uuid, f"domain {domain.name} is {domain.state}; no VM row has its UUID",
                     f"find out what runs there; virsh -c {uri} destroy {domain.uuid} && virsh -c {uri} undefine {domain.uuid}")
    return Drift(ORPHAN, "domain", server, domain.uuid, f"domain {domain.name} is {domain.state}; no VM row has its UUID",
                 REPAIR, True, UNDEFINE_DOMAIN)


def _misplaced_domain(inventory: Inventory, server: str, domain: DomainFacts, vm: VmRow, at_home: bool) -> Drift:
    """A VM's domain on a server other than its row's: a stopped stale copy beside the real one is safe to
    undefine; anything else needs a person."""
    if domain.state not in ACTIVE_STATES and at_home:
        return Drift(MISMATCHED, "domain", server, domain.uuid,
                     f"a stopped stale copy of VM {vm.name}, which runs from {vm.server}", REPAIR, True, UNDEFINE_DOMAIN)
    uri = inventory.server_uris.get(server, "<uri>")
    return Drift(MISMATCHED, "domain", server, domain.uuid,
                 f"VM {vm.name} is {domain.state} on {server}, the inventory says {vm.server or 'no server'}",
                 f"stop the copy on {server} (virsh -c {uri} destroy {domain.uuid}), then laxcluster vm start {vm.name}")


def _vm_drifts(inventory: Inventory) -> Iterator[Drift]:
    with_disk = {row.vm_uuid for row in inventory.volumes if row.role == "disk"}
    for vm in inventory.vms:
        if vm.uuid not in with_disk and vm.uuid not in inventory.busy_vms and vm.state != "installing":
            yield Drift(MISSING, "vm", "inventory", vm.uuid, f"VM {vm.name} ({vm.state}) has no disk volume row",
                        f"laxcluster vm delete {vm.name}")


def _lease_drifts(inventory: Inventory) -> Iterator[Drift]:
    vm_ids = {vm.id for vm in inventory.vms}
    for lease in inventory.leases:
        if lease.vm_id is not None and lease.vm_id not in vm_ids:
            yield Drift(ORPHAN, "lease", "inventory", str(lease.id),
                        f"lease {lease.ip} ({lease.mac}) names VM id {lease.vm_id}, which does not exist",
                        REPAIR, True, DROP_LEASE)


# -- repairs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RepairPlan:
    sans: dict[str, list[dict[str, str]]]
    servers: dict[str, list[dict[str, str]]]
    leases: list[int]


def plan_repairs(drifts: Iterable[Drift]) -> RepairPlan:
    """The repair actions of the safe drifts: per SAN and per server, in a safe order; lease ids to drop."""
    sans: dict[str, list[dict[str, str]]] = {}
    servers: dict[str, list[dict[str, str]]] = {}
    leases: list[int] = []
    for drift in drifts:
        if not drift.safe or drift.action is None:
            continue
        if drift.action == DROP_LEASE:
            leases.append(int(drift.what))
        elif drift.action == UNDEFINE_DOMAIN:
            servers.setdefault(drift.where, []).append({"op": drift.action, "what": drift.what})
        else:
            action = repair_action(drift)
            if action not in sans.setdefault(drift.where, []):
                sans[drift.where].append(action)
    for actions in sans.values():
        actions.sort(key=lambda action: SAN_ORDER.index(action["op"]))
    return RepairPlan(sans, servers, leases)


def repair_action(drift: Drift) -> dict[str, str]:
    """The action that repairs a safe drift; re-exporting covers a whole SAN."""
    return {"op": drift.action or "", "what": drift.where if drift.action == RESTORE_EXPORTS else drift.what}
