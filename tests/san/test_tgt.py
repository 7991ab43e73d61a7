"""tgt iSCSI export against a real tgtd, with QEMU's iSCSI client proving the ACL."""

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from errors import InvalidIqn, IscsiTargetBusy
from lab.processes import wait_until
from tests.fixtures.san import TgtDaemon
from tests.support import need_binary
from workers.san.tgt import (
    Export,
    Fenced,
    Nexus,
    Target,
    lowest_free_tid,
    parse_targets,
    target_iqn,
    validate_iqn,
)

CS1 = "iqn.2025-01.org.laxcluster:cs1"
CS2 = "iqn.2025-01.org.laxcluster:cs2"
FOREIGN = "iqn.2025-01.org.example:intruder"


def unique_vm() -> str:
    return f"vm-{secrets.token_hex(3)}"


def backing_file(tmp_path: Path, name: str, size: int = 16 << 20) -> str:
    path = tmp_path / f"{name}.img"
    path.write_bytes(b"")
    os.truncate(path, size)
    return str(path)


def qemu_img_info(daemon: TgtDaemon, iqn: str, initiator: str, lun: int = 1) -> subprocess.CompletedProcess[str]:
    """Log in as `initiator` with QEMU's own iSCSI client and ask for the LUN's size."""
    need_binary("qemu-img")
    opts = f"driver=iscsi,transport=tcp,portal={daemon.portal},target={iqn},lun={lun},initiator-name={initiator}"
    return subprocess.run(["qemu-img", "info", "--output=json", "--image-opts", opts],
                          capture_output=True, text=True, timeout=60)


def test_target_names_are_built_from_plain_values_and_validated() -> None:
    assert target_iqn("site-a", "web-1") == "iqn.2025-01.org.laxcluster:site-a.web-1"
    assert target_iqn("dr", "db", date="2024-12", authority="com.example") == "iqn.2024-12.com.example:dr.db"
    for bad in [("Site", "vm"), ("a", "b;rm"), ("a", "")]:
        with pytest.raises(Exception):
            target_iqn(*bad)
    with pytest.raises(InvalidIqn):
        target_iqn("a", "b", date="2024-13")
    for bad in ["iqn.2025-01.org.x:a b", "eui.0123", "iqn.25-01.org:x", "--op"]:
        with pytest.raises(InvalidIqn):
            validate_iqn(bad)


def test_tid_allocation_takes_the_lowest_free() -> None:
    assert lowest_free_tid([]) == 1
    assert lowest_free_tid([1, 2, 4]) == 3
    assert lowest_free_tid([2]) == 1


def test_parse_targets_reads_luns_acl_and_sessions() -> None:
    text = (
        "Target 3: iqn.2025-01.org.laxcluster:a.b\n"
        "    System information:\n        Driver: iscsi\n        State: ready\n"
        "    I_T nexus information:\n        I_T nexus: 1\n            Initiator: iqn.x:cs1 alias: none\n"
        "            Connection: 0\n                IP Address: 127.0.0.1\n"
        "    LUN information:\n        LUN: 0\n            Type: controller\n            Backing store path: None\n"
        "        LUN: 1\n            Type: disk\n            Backing store path: /pool/b.img\n"
        "    Account information:\n    ACL information:\n        iqn.x:cs1\n        iqn.x:cs2\n"
    )
    assert parse_targets(text) == [Target(3, "iqn.2025-01.org.laxcluster:a.b", {1: "/pool/b.img"}, ("iqn.x:cs1", "iqn.x:cs2"), 1,
                                          (Nexus(1, "iqn.x:cs1", (0,)),))]


@pytest.mark.integration
def test_export_is_idempotent_and_only_bound_initiators_log_in(tgtd: TgtDaemon, tmp_path: Path) -> None:
    tgt, iqn = tgtd.tgt, target_iqn("site-a", unique_vm())
    disk = backing_file(tmp_path, "disk0")
    tid = tgt.ensure_target(iqn)
    assert tgt.ensure_target(iqn) == tid
    tgt.export_lun(iqn, 1, disk)
    tgt.export_lun(iqn, 1, disk)
    tgt.bind_initiators(iqn, [CS1, CS2])
    tgt.bind_initiators(iqn, [CS1, CS2])
    assert tgt.list_targets() == [Target(tid, iqn, {1: disk}, (CS1, CS2), 0)]

    bound = qemu_img_info(tgtd, iqn, CS1)
    assert bound.returncode == 0, bound.stderr
    assert '"virtual-size": 16777216' in bound.stdout
    foreign = qemu_img_info(tgtd, iqn, FOREIGN)
    assert foreign.returncode != 0
    assert "Target not found" in foreign.stderr

    tgt.bind_initiators(iqn, [CS2])
    assert qemu_img_info(tgtd, iqn, CS1).returncode != 0, "an unbound initiator is locked out again"

    tgt.unexport(iqn)
    tgt.unexport(iqn)
    assert tgt.find(iqn) is None


@pytest.mark.integration
def test_export_lun_replaces_a_lun_serving_another_path(tgtd: TgtDaemon, tmp_path: Path) -> None:
    tgt, iqn = tgtd.tgt, target_iqn("site-a", unique_vm())
    tgt.export_lun(iqn, 1, backing_file(tmp_path, "old", 8 << 20))
    new = backing_file(tmp_path, "new", 32 << 20)
    tgt.export_lun(iqn, 1, new)
    tgt.export_lun(iqn, 2, backing_file(tmp_path, "data"))
    tgt.unexport_lun(iqn, 2)
    tgt.unexport_lun(iqn, 2)
    tgt.bind_initiators(iqn, [CS1])
    assert tgt.find(iqn).luns == {1: new}
    info = qemu_img_info(tgtd, iqn, CS1)
    assert '"virtual-size": 33554432' in info.stdout, info.stderr


@pytest.mark.integration
def test_second_target_gets_the_next_tid_and_busy_target_is_not_deleted(tgtd: TgtDaemon, tmp_path: Path) -> None:
    tgt = tgtd.tgt
    first, second = target_iqn("site-a", unique_vm()), target_iqn("site-a", unique_vm())
    assert (tgt.ensure_target(first), tgt.ensure_target(second)) == (1, 2)
    tgt.unexport(first)
    assert tgt.ensure_target(first) == 1

    tgt.export_lun(second, 1, backing_file(tmp_path, "busy"))
    tgt.bind_initiators(second, [CS1])
    need_binary("qemu-io")
    opts = f"driver=iscsi,transport=tcp,portal={tgtd.portal},target={second},lun=1,initiator-name={CS1}"
    # qemu-io without -c stays logged in, reading commands, until it gets "quit".
    holder = subprocess.Popen(["qemu-io", "--image-opts", opts], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: tgt.find(second).sessions == 1, 20, "QEMU to log in")
        with pytest.raises(IscsiTargetBusy):
            tgt.unexport(second)
        assert tgt.find(second) is not None
    finally:
        holder.communicate(b"quit\n", timeout=20)
    tgt.unexport(second)
    assert [t.iqn for t in tgt.list_targets()] == [first]


@pytest.mark.integration
def test_reconcile_restores_exports_after_tgtd_restart(tgtd: TgtDaemon, tmp_path: Path) -> None:
    vm_a, vm_b = target_iqn("site-a", unique_vm()), target_iqn("site-a", unique_vm())
    desired = [
        Export(vm_a, {1: backing_file(tmp_path, "a0"), 2: backing_file(tmp_path, "a1")}, (CS1, CS2)),
        Export(vm_b, {1: backing_file(tmp_path, "b0")}, (CS1,)),
    ]
    assert len(tgtd.tgt.reconcile(desired)) == 2
    assert tgtd.tgt.reconcile(desired) == [], "a second pass changes nothing"
    served = {t.iqn: (t.luns, set(t.initiators)) for t in tgtd.tgt.list_targets()}

    tgtd.stop()
    tgtd.start()
    assert tgtd.tgt.list_targets() == []
    assert qemu_img_info(tgtd, vm_a, CS1).returncode != 0

    stray = target_iqn("site-a", unique_vm())
    tgtd.tgt.ensure_target(stray)
    tgtd.tgt.reconcile(desired, prune=True)
    assert {t.iqn: (t.luns, set(t.initiators)) for t in tgtd.tgt.list_targets()} == served
    assert qemu_img_info(tgtd, vm_a, CS2, lun=2).returncode == 0
    assert qemu_img_info(tgtd, vm_b, CS2).returncode != 0


@pytest.mark.integration
def test_fence_drops_an_open_session_and_keeps_the_initiator_out(tgtd: TgtDaemon, tmp_path: Path) -> None:
    tgt = tgtd.tgt
    shared, other = target_iqn("site-a", unique_vm()), target_iqn("site-a", unique_vm())
    disk = backing_file(tmp_path, "fenced")
    for iqn in (shared, other):
        tgt.export_lun(iqn, 1, disk if iqn == shared else backing_file(tmp_path, "other"))
    tgt.bind_initiators(shared, [CS1, CS2])
    tgt.bind_initiators(other, [CS2])
    need_binary("qemu-io")
    opts = f"driver=iscsi,transport=tcp,portal={tgtd.portal},target={shared},lun=1,initiator-name={CS1}"
    holder = subprocess.Popen(["qemu-io", "--image-opts", opts], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: tgt.find(shared).sessions == 1, 20, "QEMU to log in")
        assert [n.initiator for n in tgt.find(shared).nexuses] == [CS1]

        assert tgt.fence(CS1) == Fenced([shared], 1)

        fenced = tgt.find(shared)
        assert (fenced.initiators, fenced.sessions) == ((CS2,), 0)
        assert tgt.find(other).initiators == (CS2,)
        # The old session's holder writes on: the write must never reach the disk.
        holder.stdin.write(b"write -P 0xab 0 4k\nflush\nquit\n")
        holder.stdin.flush()
        with pytest.raises(subprocess.TimeoutExpired):
            holder.wait(10)
        assert b"\xab" not in Path(disk).read_bytes()[:4096]
        assert qemu_img_info(tgtd, shared, CS1).returncode != 0
        assert qemu_img_info(tgtd, shared, CS2).returncode == 0
    finally:
        holder.kill()
        holder.wait(10)
