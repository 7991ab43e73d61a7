"""The interface every volume backend implements, its handles, its errors and change-map helpers.

Handles are plain strings so they can be stored in the inventory as they are:
a volume handle is the volume's name (`[a-z0-9-]`), a snapshot handle is
`<volume>@<snapshot>` with both parts named the same way. Backends map handles to
their own storage (a file in a pool directory, a logical volume) and never let a
handle reach a path or a command line without `parse_volume`/`parse_snapshot`.
"""

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from errors import InvalidName, InvalidSize

SECTOR = 512
NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62})")

Range = tuple[int, int]  # (offset, length) in bytes


def validate_name(name: str) -> str:
    """Return `name` if it is `[a-z0-9-]` (starting alphanumeric, at most 63 long); raise InvalidName."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidName(f"invalid name {name!r}: use a-z, 0-9 and '-', starting with a letter or digit", name=name)
    return name


def validate_size(size_bytes: int) -> int:
    """Return `size_bytes` if it is a positive whole number of 512-byte sectors; raise InvalidSize."""
    if not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes <= 0 or size_bytes % SECTOR:
        raise InvalidSize(f"invalid size {size_bytes!r}: a positive multiple of {SECTOR} bytes", size=size_bytes)
    return size_bytes


def snapshot_handle(volume: str, snap_name: str) -> str:
    """The handle of snapshot `snap_name` of `volume`."""
    return f"{validate_name(volume)}@{validate_name(snap_name)}"


def parse_volume(handle: str) -> str:
    """Return the volume name a volume handle stands for; raise InvalidName for anything else."""
    return validate_name(handle)


def parse_snapshot(handle: str) -> tuple[str, str]:
    """Return (volume, snapshot) of a snapshot handle; raise InvalidName for anything else."""
    volume, sep, snap = handle.partition("@") if isinstance(handle, str) else ("", "", "")
    if not sep:
        raise InvalidName(f"invalid snapshot handle {handle!r}: expected <volume>@<snapshot>", handle=handle)
    return validate_name(volume), validate_name(snap)


def is_snapshot(handle: str) -> bool:
    return isinstance(handle, str) and "@" in handle


def align_and_merge(ranges: Iterable[Range], block_size: int, limit: int) -> list[Range]:
    """Widen each (offset, length) to whole `block_size` blocks, clip at `limit`, sort and merge touching ranges."""
    widened = []
    for offset, length in ranges:
        if length <= 0:
            continue
        start = offset - offset % block_size
        end = min(-(-(offset + length) // block_size) * block_size, limit)
        if start < end:
            widened.append((start, end))
    merged: list[list[int]] = []
    for start, end in sorted(widened):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]


class VolumeBackend(ABC):
    """What the SAN worker needs from a volume backend.

    Sizes are exact byte counts. Every operation is idempotent where the brief of a job
    needs it to be: `delete` and `delete_snapshot` of something missing succeed.
    `change_block_size` is the granularity of `changed_ranges`: the finest the backend knows (the
    pool filesystem's block for reflink, the thin pool's chunk for LVM), or coarser if configured so.
    """

    name: str
    change_block_size: int

    @abstractmethod
    def create(self, name: str, size_bytes: int) -> str:
        """Create an empty (zero-reading, thin where possible) volume; raise VolumeExists or NoSpace."""

    @abstractmethod
    def clone(self, source_handle: str, name: str) -> str:
        """Create volume `name` with the content of a volume or snapshot (copy-on-write where possible)."""

    @abstractmethod
    def snapshot(self, handle: str, snap_name: str) -> str:
        """Take a read-only, point-in-time snapshot of a volume; return its snapshot handle."""

    @abstractmethod
    def delete(self, handle: str) -> None:
        """Delete a volume; succeed if it does not exist. Its snapshots are independent and stay."""

    @abstractmethod
    def delete_snapshot(self, snap_handle: str) -> None:
        """Delete a snapshot; succeed if it does not exist."""

    @abstractmethod
    def resize(self, handle: str, new_size_bytes: int, *, contents_fit: bool = False) -> None:
        """Grow a volume to `new_size_bytes`. Shrinking raises ShrinkRefused unless `contents_fit`:
        the caller (workers.san.shrink) promises every byte of data already lies below the new size."""

    @abstractmethod
    def size(self, handle: str) -> int:
        """Size in bytes of a volume or snapshot; raise VolumeNotFound."""

    @abstractmethod
    def exists(self, handle: str) -> bool:
        """Whether the volume or snapshot exists."""

    @abstractmethod
    def changed_ranges(self, old_snap: str, new_handle: str) -> list[Range]:
        """Byte ranges whose content may differ between snapshot `old_snap` and `new_handle`
        (a later snapshot, or a volume that is not being written).

        Sorted, merged, aligned to `change_block_size` (the last range may end at the new
        size instead). Reading these ranges from `new_handle` onto a copy of `old_snap`
        truncated to `size(new_handle)` reproduces `new_handle` bit for bit. A range may be
        reported although its bytes are equal (never the other way round)."""

    @abstractmethod
    def path_for_export(self, handle: str) -> str:
        """A file or block device path tgt can serve as a LUN; raise VolumeNotFound."""

    @abstractmethod
    def facts(self) -> dict[str, Any]:
        """Backend name, total/free bytes, whether reflink (or thin snapshots) are supported, fallback in use."""

    @abstractmethod
    def listing(self) -> dict[str, str]:
        """Every volume and snapshot handle in the backend with the path tgt would serve it from, read
        without activating or changing anything (what `laxcluster check` compares with the inventory)."""
