"""A SAN's storage pool: an XFS (reflink=1) filesystem in a sparse image file, loop-mounted.

It is mounted in the root mount namespace, where the SAN worker and tgtd see it.
"""

from __future__ import annotations

import re
from pathlib import Path

from workers.command import output, run


def ensure(image: Path, size: int, mountpoint: Path) -> str:
    """Make `image` (formatted once, `size` bytes, sparse) mounted at `mountpoint`; return its loop device.

    An existing image is reused as it is (its volumes are the SAN's data); harmless if already mounted.
    """
    if not image.exists():
        _make_filesystem(image, size)
    mountpoint.mkdir(parents=True, exist_ok=True)
    target = mountpoint.resolve()
    loops = loop_devices(image)
    loop = loops[0] if loops else output(["losetup", "--find", "--show", str(image)]).strip()
    if not is_mounted(target):
        # The pool sits on a shared mount of its own directory: every mount namespace made while
        # it is mounted (each QEMU that any libvirtd starts gets one) then receives our unmount
        # too, instead of keeping a private copy that holds the loop device busy forever.
        run(["mount", "--bind", str(target), str(target)])
        run(["mount", "--make-shared", str(target)])
    if not is_mounted(target, source=loop):
        run(["mount", "-t", "xfs", loop, str(target)])
    return loop


def teardown(image: Path, mountpoint: Path) -> None:
    """Unmount `mountpoint` (the pool and its shared base) and detach every loop device of `image`; harmless if done."""
    unmount_all(mountpoint)
    for loop in loop_devices(image):
        run(["losetup", "--detach", loop], check=False)


def unmount_all(mountpoint: Path) -> None:
    """Unmount everything stacked at `mountpoint`."""
    while is_mounted(mountpoint):
        run(["umount", str(mountpoint.resolve())])


def is_mounted(mountpoint: Path, source: str | None = None) -> bool:
    """True if something (or, given `source`, that device) is mounted at `mountpoint`."""
    target = mountpoint.resolve()
    return any(t == target and source in (None, s) for s, t in mount_table())


def mount_table() -> list[tuple[str, Path]]:
    """(source, mount point) of every mount of the current mount namespace, in mount order."""
    entries = (line.split() for line in Path("/proc/mounts").read_text().splitlines())
    return [(_unescape(fields[0]), Path(_unescape(fields[1]))) for fields in entries]


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below `directory`, deepest first (the order to unmount them in)."""
    root = directory.resolve()
    found = [m for _source, m in mount_table() if m == root or root in m.parents]
    return sorted(set(found), key=lambda m: len(m.parts), reverse=True)


def loop_devices(image: Path) -> list[str]:
    """Loop devices backed by `image` (`losetup -j`)."""
    if not image.exists():
        return []
    listing = output(["losetup", "--associated", str(image.resolve()), "--noheadings", "--output", "NAME"])
    return [line.strip() for line in listing.splitlines() if line.strip()]


def _unescape(field: str) -> str:
    # /proc/mounts writes blanks and backslashes in paths as octal escapes (\040).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _make_filesystem(image: Path, size: int) -> None:
    image.parent.mkdir(parents=True, exist_ok=True)
    partial = image.with_suffix(".partial")
    with open(partial, "wb") as f:
        f.truncate(size)
    run(["mkfs.xfs", "-q", "-m", "reflink=1", str(partial)])
    partial.rename(image)  # only a fully formatted image ever carries the real name
