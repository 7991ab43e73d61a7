"""iSCSI export with tgt: one target per VM, a LUN per disk, an initiator ACL per target.

Everything goes through `tgtadm` argument lists against one tgtd (its control port).
Operations are idempotent and read the daemon's own listing to decide what to do, so
re-running one after a crash, or `reconcile` after a tgtd restart, converges.

tgt fixes a LUN's size when the LUN is created: after a volume grows, re-create the LUN
(`unexport_lun` + `export_lun`) while no initiator uses it.
"""

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from errors import CommandFailed, Conflict, FenceFailed, InvalidInput, InvalidIqn, IscsiTargetBusy, TargetNotFound
from workers.command import output, run
from workers.san.backend import validate_name

IQN_RE = re.compile(r"iqn\.\d{4}-\d{2}\.[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[a-z0-9][a-z0-9.:_-]*)?")
AUTHORITY_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")
DATE_RE = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
MAX_LUN = 255
TID_RACE_RETRIES = 3


def validate_iqn(iqn: str) -> str:
    """Return `iqn` if it is a lower-case iSCSI qualified name (iqn.YYYY-MM.authority[:unique])."""
    if not isinstance(iqn, str) or len(iqn) > 223 or not IQN_RE.fullmatch(iqn):
        raise InvalidIqn(f"invalid iSCSI name {iqn!r}: expected iqn.YYYY-MM.reversed.domain[:name]", iqn=iqn)
    return iqn


def target_iqn(site: str, vm: str, *, date: str = "2025-01", authority: str = "org.laxcluster") -> str:
    """The target name of a VM: `iqn.<date>.<authority>:<site>.<vm>` (authority is a reversed domain)."""
    if not DATE_RE.fullmatch(date) or not AUTHORITY_RE.fullmatch(authority):
        raise InvalidIqn(f"invalid naming date {date!r} or authority {authority!r}", date=date, authority=authority)
    return validate_iqn(f"iqn.{date}.{authority}:{validate_name(site)}.{validate_name(vm)}")


@dataclass(frozen=True)
class Nexus:
    """A logged-in session (tgt's I_T nexus): its id, the initiator's name, its connection ids."""

    sid: int
    initiator: str
    connections: tuple[int, ...] = ()


@dataclass(frozen=True)
class Target:
    """A target as tgtd reports it: disk LUNs (number -> backing path), ACL, logged-in sessions."""

    tid: int
    iqn: str
    luns: dict[int, str] = field(default_factory=dict)
    initiators: tuple[str, ...] = ()
    sessions: int = 0
    nexuses: tuple[Nexus, ...] = ()


@dataclass(frozen=True)
class Fenced:
    """What a fence found: the targets the initiator could reach, and its sessions it had open (dropped)."""

    targets: list[str]
    sessions: int


@dataclass(frozen=True)
class Export:
    """What should be exported: a target, its LUNs (number -> backing path) and who may log in."""

    iqn: str
    luns: dict[int, str]
    initiators: tuple[str, ...]


def parse_targets(text: str) -> list[Target]:
    """Parse `tgtadm --op show --mode target`; LUN 0 (tgt's controller) is left out."""
    targets: list[Target] = []
    current: dict | None = None
    section, lun = "", None
    for line in text.splitlines():
        stripped = line.strip()
        if match := re.fullmatch(r"Target (\d+): (\S+)", line):
            current = {"tid": int(match[1]), "iqn": match[2], "luns": {}, "initiators": [], "nexuses": []}
            targets.append(current)  # type: ignore[arg-type]
            section, lun = "", None
        elif current is None or not stripped:
            continue
        elif line.startswith("    ") and not line.startswith("     ") and stripped.endswith(":"):
            section = stripped[:-1]
        elif section == "LUN information" and (match := re.fullmatch(r"LUN: (\d+)", stripped)):
            lun = int(match[1])
        elif section == "LUN information" and stripped.startswith("Backing store path:") and lun:
            current["luns"][lun] = stripped.split(":", 1)[1].strip()
        elif section == "I_T nexus information":
            _read_nexus_line(current["nexuses"], stripped)
        elif section == "ACL information":
            current["initiators"].append(stripped)
    return [Target(t["tid"], t["iqn"], t["luns"], tuple(t["initiators"]), len(t["nexuses"]),  # type: ignore[index]
                   tuple(Nexus(n["sid"], n["initiator"], tuple(n["connections"])) for n in t["nexuses"]))
            for t in targets]


def _read_nexus_line(nexuses: list[dict], line: str) -> None:
    if match := re.fullmatch(r"I_T nexus: (\d+)", line):
        nexuses.append({"sid": int(match[1]), "initiator": "", "connections": []})
    elif nexuses and (match := re.fullmatch(r"Initiator: (\S+).*", line)):
        nexuses[-1]["initiator"] = match[1]
    elif nexuses and (match := re.fullmatch(r"Connection: (\d+)", line)):
        nexuses[-1]["connections"].append(int(match[1]))


class Tgt:
    """A tgtd reached through `tgtadm` on `control_port` (tgtd's default control port when None)."""

    def __init__(self, control_port: int | None = None, lld: str = "iscsi") -> None:
        self.control_port = control_port
        self.lld = lld

    def argv(self, *args: str) -> list[str]:
        """The tgtadm command line for `args`."""
        port = ["-C", str(self.control_port)] if self.control_port is not None else []
        return ["tgtadm", *port, "--lld", self.lld, *args]

    def list_targets(self) -> list[Target]:
        return parse_targets(output(self.argv("--op", "show", "--mode", "target")))

    def find(self, iqn: str) -> Target | None:
        return next((t for t in self.list_targets() if t.iqn == iqn), None)

    def _require(self, iqn: str) -> Target:
        target = self.find(validate_iqn(iqn))
        if target is None:
            raise TargetNotFound(f"no iSCSI target {iqn}", iqn=iqn)
        return target

    def ensure_target(self, iqn: str, tid: int | None = None) -> int:
        """Make sure target `iqn` exists; return its tid (the lowest free one unless `tid` is given)."""
        validate_iqn(iqn)
        for _ in range(TID_RACE_RETRIES):
            targets = self.list_targets()
            if existing := next((t for t in targets if t.iqn == iqn), None):
                return existing.tid
            chosen = tid if tid is not None else lowest_free_tid(t.tid for t in targets)
            try:
                run(self.argv("--op", "new", "--mode", "target", "--tid", str(chosen), "-T", iqn))
                return chosen
            except CommandFailed:
                if tid is not None and self.find(iqn) is None:
                    raise
        raise Conflict(f"could not allocate a tid for {iqn}: another client keeps taking it", iqn=iqn)

    def export_lun(self, iqn: str, lun: int, path: str) -> None:
        """Serve `path` (a file or block device) as LUN `lun` of target `iqn`; a LUN already serving
        `path` is left alone, one serving another path is replaced."""
        if not 1 <= lun <= MAX_LUN:
            raise InvalidInput(f"LUN {lun} out of range 1..{MAX_LUN}", lun=lun)
        if not os.path.isabs(path) or not os.path.exists(path):
            raise InvalidInput(f"backing store {path!r} is not an existing absolute path", path=path)
        tid = self.ensure_target(iqn)
        current = self._require(iqn).luns.get(lun)
        if current == path:
            return
        if current is not None:
            self.unexport_lun(iqn, lun)
        run(self.argv("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(lun),
                      "--backing-store", path))

    def unexport_lun(self, iqn: str, lun: int) -> None:
        """Remove LUN `lun` from target `iqn`; a missing target or LUN is fine."""
        target = self.find(validate_iqn(iqn))
        if target is not None and lun in target.luns:
            run(self.argv("--op", "delete", "--mode", "logicalunit", "--tid", str(target.tid), "--lun", str(lun)))

    def bind_initiators(self, iqn: str, initiators: Sequence[str]) -> None:
        """Make the target's ACL exactly `initiators`: only they can log in."""
        wanted = {validate_iqn(name) for name in initiators}
        target = self._require(iqn)
        for name in sorted(wanted - set(target.initiators)):
            run(self.argv("--op", "bind", "--mode", "target", "--tid", str(target.tid), "--initiator-name", name))
        for name in sorted(set(target.initiators) - wanted):
            run(self.argv("--op", "unbind", "--mode", "target", "--tid", str(target.tid), "--initiator-name", name))

    def unexport(self, iqn: str, *, force: bool = False) -> None:
        """Delete target `iqn` and its LUNs; a missing target is fine. Refuses (IscsiTargetBusy) while
        initiators are logged in, unless `force`."""
        target = self.find(validate_iqn(iqn))
        if target is None:
            return
        if target.sessions and not force:
            raise IscsiTargetBusy(f"{iqn} has {target.sessions} initiator session(s) logged in", iqn=iqn,
                             sessions=target.sessions)
        run(self.argv("--op", "delete", "--mode", "target", "--tid", str(target.tid), *(["--force"] if force else [])))

    def reconcile(self, desired: Iterable[Export], *, prune: bool = False) -> list[str]:
        """Make tgtd serve exactly `desired` (targets, LUNs, ACLs); with `prune`, delete other targets too.
        Returns what was changed, one line per target touched."""
        desired = list(desired)
        before = {t.iqn: t for t in self.list_targets()}
        for export in desired:
            self.ensure_target(export.iqn)
            for lun in set(before.get(export.iqn, Target(0, export.iqn)).luns) - set(export.luns):
                self.unexport_lun(export.iqn, lun)
            for lun, path in sorted(export.luns.items()):
                self.export_lun(export.iqn, lun, path)
            self.bind_initiators(export.iqn, export.initiators)
        if prune:
            for iqn in set(before) - {export.iqn for export in desired}:
                self.unexport(iqn, force=True)
        after = {t.iqn: t for t in self.list_targets()}
        return [f"{iqn}: {describe(before.get(iqn))} -> {describe(after.get(iqn))}"
                for iqn in sorted(set(before) | set(after)) if _view(before.get(iqn)) != _view(after.get(iqn))]

    def fence(self, initiator: str) -> "Fenced":
        """Lock `initiator` out of every target: take it off each ACL and drop its sessions, so neither a
        new login nor a session already open can reach a LUN. Returns the targets it was bound to or
        logged in to, and how many sessions it still had. Raises FenceFailed unless tgtd then shows it nowhere."""
        validate_iqn(initiator)
        touched, sessions = [], 0
        for target in self.list_targets():
            mine = [nexus for nexus in target.nexuses if nexus.initiator == initiator]
            if initiator in target.initiators:
                run(self.argv("--op", "unbind", "--mode", "target", "--tid", str(target.tid),
                              "--initiator-name", initiator))
            for nexus, cid in ((nexus, cid) for nexus in mine for cid in nexus.connections):
                self._drop_connection(target.tid, nexus.sid, cid)
            if mine or initiator in target.initiators:
                touched.append(target.iqn)
            sessions += len(mine)
        self._confirm_fenced(initiator)
        return Fenced(touched, sessions)

    def lock_out(self, iqn: str) -> int:
        """Let no initiator reach target `iqn`: empty its ACL and drop its sessions. Returns how many sessions
        were dropped; raises FenceFailed unless tgtd then shows the target with neither."""
        target = self._require(iqn)
        self.bind_initiators(iqn, [])
        for nexus, cid in ((nexus, cid) for nexus in target.nexuses for cid in nexus.connections):
            self._drop_connection(target.tid, nexus.sid, cid)
        after = self._require(iqn)
        if after.initiators or after.nexuses:
            raise FenceFailed(f"{iqn} still lets {', '.join(sorted({*after.initiators, *(n.initiator for n in after.nexuses)}))} in "
                              "after locking it", targets=[iqn])
        return len(target.nexuses)

    def _drop_connection(self, tid: int, sid: int, cid: int) -> None:
        try:
            run(self.argv("--op", "delete", "--mode", "conn", "--tid", str(tid), "--sid", str(sid), "--cid", str(cid)))
        except CommandFailed:
            pass  # the connection ended by itself meanwhile; the confirmation below tells

    def _confirm_fenced(self, initiator: str) -> None:
        left = [t.iqn for t in self.list_targets()
                if initiator in t.initiators or any(n.initiator == initiator for n in t.nexuses)]
        if left:
            raise FenceFailed(f"{initiator} still reaches {', '.join(left)} after fencing", initiator=initiator,
                              targets=left)

    def stop_daemon(self) -> None:
        """Delete every target, then ask tgtd to exit (it ignores SIGTERM)."""
        for target in self.list_targets():
            run(self.argv("--op", "delete", "--mode", "target", "--tid", str(target.tid), "--force"))
        run(self.argv("--op", "delete", "--mode", "system"))


def lowest_free_tid(used: Iterable[int]) -> int:
    taken = set(used)
    return next(tid for tid in range(1, len(taken) + 2) if tid not in taken)


def _view(target: Target | None) -> tuple | None:
    return None if target is None else (target.luns, sorted(target.initiators))


def describe(target: Target | None) -> str:
    if target is None:
        return "absent"
    return f"luns {sorted(target.luns)} acl {sorted(target.initiators)}"
