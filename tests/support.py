"""Small helpers shared by the tests: where the repository is, missing components, file digests and writes.

Waiting on a condition and a free port come from the lab (`lab.processes.wait_until`, `free_port`)."""

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
LAB_BINARIES = ("ip", "nsenter", "unshare", "losetup", "mkfs.xfs", "libvirtd", "virtlogd", "virtlockd", "tgtd", "tgtadm", "dnsmasq", "dhcp_release")


def missing(reason: str) -> None:
    """Skip for a missing real component, except under CI, where that is a failure."""
    if IN_CI:
        pytest.fail(f"required component missing under CI: {reason}")
    pytest.skip(reason)


def need_binary(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            missing(f"{name} is not installed (make setup installs it)")


def need_root() -> None:
    if os.geteuid() != 0:
        missing("needs root (namespaces, loop devices, daemons)")


def need_lab() -> None:
    need_root()
    need_binary(*LAB_BINARIES)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_at(path: str | Path, offset: int, data: bytes) -> None:
    """Overwrite `data` at `offset` of a file and flush it to disk."""
    with open(path, "r+b") as target:
        target.seek(offset)
        target.write(data)
        os.fsync(target.fileno())


def damage_chunk(root: str | Path, store: Any, digest: str, at: int, data: bytes) -> None:
    """Overwrite `data` at byte `at` of a chunk's stored bytes where the store keeps them (in its pack,
    or its own file in a store written before packs); `root` is the store's directory on this host."""
    relpath, offset, _ = store.locate(digest)
    write_at(Path(root) / relpath, offset + at, data)


# libvirt's test:///default driver has one running domain, "test", always with this UUID.
TEST_DRIVER_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
