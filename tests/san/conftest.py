"""Fixtures for the SAN worker: real filesystems on loop devices, cleaned up even on failure."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import need_binary, need_root

# mkfs.xfs refuses filesystems under 300 MB; the images are sparse, so this costs no disk.
IMAGE_SIZES = {"xfs": "320M", "btrfs": "256M", "ext4": "64M"}
MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}


def loop_devices_of(image: Path) -> list[str]:
    """Loop devices currently backed by `image`."""
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=False).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line]


def detach_all(image: Path) -> None:
    for device in loop_devices_of(image):
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


def mounted_filesystem(fstype: str, tmp_path: Path) -> Iterator[Path]:
    """Make a `fstype` filesystem on a sparse image under `tmp_path`, loop-mount it, yield the mount point;
    unmount and detach the loop device afterwards whatever happened."""
    need_root()
    need_binary(MKFS[fstype][0], "losetup", "mount")
    image, mountpoint = tmp_path / f"{fstype}.img", tmp_path / f"{fstype}-mnt"
    mountpoint.mkdir()
    subprocess.run(["truncate", "-s", IMAGE_SIZES[fstype], str(image)], check=True)
    subprocess.run([*MKFS[fstype], str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True, capture_output=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)
        detach_all(image)


@pytest.fixture(params=["xfs", "btrfs", "ext4"])
def pool_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A pool directory on a fresh XFS (reflink=1), btrfs, or ext4 (no reflink: the fallback)."""
    yield from mounted_filesystem(request.param, tmp_path)


@pytest.fixture
def xfs_dir(tmp_path: Path) -> Iterator[Path]:
    yield from mounted_filesystem("xfs", tmp_path)


@pytest.fixture
def ext4_dir(tmp_path: Path) -> Iterator[Path]:
    yield from mounted_filesystem("ext4", tmp_path)
