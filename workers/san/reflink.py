"""Volumes as raw image files in a pool directory on XFS (reflink=1) or btrfs.

Clones and snapshots are reflink copies (FICLONE): instant and copy-on-write. Changed
ranges come from the files' extent maps (FIEMAP): a byte that both files map to the same
physical block at the same offset is unchanged. On a filesystem without reflink (ext4)
the backend copies sparsely and compares bytes instead, and `facts()` says so. Either way
changes are told to the filesystem's block: a guest's 4 KiB write is a 4 KiB range.

Layout: `<pool>/<volume>.img` and `<pool>/<volume>@<snapshot>.snap`; new files are made
under a dot-name and linked into place, so a crash leaves no half-made volume visible.
"""

import errno
import fcntl
import os
import secrets
import struct
from dataclasses import dataclass
from typing import Any

from errors import InvalidName, NoSpace, ShrinkRefused, VolumeExists, VolumeNotFound
from workers.san.backend import (
    Range,
    VolumeBackend,
    align_and_merge,
    is_snapshot,
    parse_snapshot,
    parse_volume,
    validate_name,
    validate_size,
)
from workers.san.sparse import data_segments

FICLONE = 0x40049409
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_HEADER = struct.Struct("=QQIIII")
FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")
FIEMAP_BATCH = 256
FIEMAP_EXTENT_LAST = 0x1
# Extents whose physical address does not identify their bytes (delayed allocation,
# compressed/encrypted/inline data): never trusted to prove "unchanged".
FIEMAP_UNTRUSTED = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
NO_REFLINK_ERRNOS = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS, errno.EPERM}
COPY_CHUNK = 1 << 20
# The byte comparison reads windows this big and compares blocks only inside a window that differs.
# Measured on 512 MiB (warm, ext4, 4 KiB blocks): a pread per block 0.19 s, 1 MiB windows 0.16 s,
# 256 KiB windows 0.12 s, as fast as the 64 KiB blocks compared before.
COMPARE_WINDOW = 256 * 1024


@dataclass(frozen=True)
class Extent:
    """One FIEMAP extent: `length` bytes at file offset `logical` live at disk offset `physical`."""

    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length

    @property
    def trusted(self) -> bool:
        return not self.flags & FIEMAP_UNTRUSTED


def extent_at(buffer: bytearray, index: int) -> Extent:
    logical, physical, length, _, _, flags, *_ = FIEMAP_EXTENT.unpack_from(
        buffer, FIEMAP_HEADER.size + index * FIEMAP_EXTENT.size
    )
    return Extent(logical, physical, length, flags)


def fiemap(fd: int) -> list[Extent]:
    """The file's extent map, synced first so delayed allocations have their final place."""
    extents: list[Extent] = []
    start = 0
    while True:
        request = bytearray(FIEMAP_HEADER.size + FIEMAP_BATCH * FIEMAP_EXTENT.size)
        FIEMAP_HEADER.pack_into(request, 0, start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC, 0, FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
        mapped = FIEMAP_HEADER.unpack_from(request, 0)[3]
        batch = [extent_at(request, i) for i in range(mapped)]
        extents.extend(batch)
        if not batch or batch[-1].flags & FIEMAP_EXTENT_LAST:
            return extents
        start = batch[-1].end


def clip(extents: list[Extent], limit: int) -> list[Extent]:
    """Extents cut at `limit` (file size): blocks past EOF are not content."""
    return [
        Extent(e.logical, e.physical, min(e.end, limit) - e.logical, e.flags)
        for e in extents
        if e.logical < limit
    ]


def shared_spans(old: list[Extent], new: list[Extent]) -> list[Range]:
    """Spans (offset, length) that both files map to the same physical bytes at the same offset."""
    spans = []
    i = j = 0
    while i < len(old) and j < len(new):
        a, b = old[i], new[j]
        start, end = max(a.logical, b.logical), min(a.end, b.end)
        same_place = a.physical - a.logical == b.physical - b.logical
        same_kind = a.flags & FIEMAP_EXTENT_UNWRITTEN == b.flags & FIEMAP_EXTENT_UNWRITTEN
        if start < end and same_place and same_kind and a.trusted and b.trusted:
            spans.append((start, end - start))
        if a.end <= b.end:
            i += 1
        else:
            j += 1
    return spans


def subtract(ranges: list[Range], minus: list[Range]) -> list[Range]:
    """`ranges` minus `minus`; both sorted, non-overlapping (offset, length) lists."""
    result = []
    j = 0
    for offset, length in ranges:
        cursor, end = offset, offset + length
        while j < len(minus) and minus[j][0] + minus[j][1] <= cursor:
            j += 1
        k = j
        while k < len(minus) and minus[k][0] < end:
            if minus[k][0] > cursor:
                result.append((cursor, minus[k][0] - cursor))
            cursor = max(cursor, minus[k][0] + minus[k][1])
            k += 1
        if cursor < end:
            result.append((cursor, end - cursor))
    return result


def union(*lists: list[Range]) -> list[Range]:
    """Sorted, merged union of (offset, length) lists."""
    return align_and_merge([r for ranges in lists for r in ranges], 1, 2**63)


def changed_by_extents(old: list[Extent], old_size: int, new: list[Extent], new_size: int) -> list[Range]:
    """Unaligned ranges of `new` that may differ from `old`: data in either file not shared by both.
    A hole in both files is unchanged (both read zeros)."""
    old, new = clip(old, old_size), clip(new, new_size)
    data = union([(e.logical, e.length) for e in old], [(e.logical, e.length) for e in new])
    return subtract(data, union(shared_spans(old, new)))


def changed_by_comparison(old_fd: int, new_fd: int, block: int) -> list[Range]:
    """Blocks of `new` whose bytes differ from `old` (past old's end, `old` reads as zeros).

    Read in windows of about COMPARE_WINDOW, compared per block only where a window differs."""
    new_size = os.fstat(new_fd).st_size
    span = max(block, COMPARE_WINDOW // block * block)
    candidates = align_and_merge([*data_segments(old_fd), *data_segments(new_fd)], span, new_size)
    changed = []
    for offset, length in candidates:
        for window in range(offset, offset + length, span):
            want = min(span, offset + length - window)
            new = os.pread(new_fd, want, window)
            old = os.pread(old_fd, want, window).ljust(len(new), b"\0")
            if old == new:
                continue
            for at in range(0, len(new), block):
                if old[at:at + block] != new[at:at + block]:
                    changed.append((window + at, min(block, len(new) - at)))
    return changed


def sparse_copy(src_fd: int, dst_fd: int) -> None:
    """Copy `src` into the empty `dst`, leaving holes where `src` has holes or zero chunks."""
    size = os.fstat(src_fd).st_size
    for offset, length in data_segments(src_fd):
        for at in range(offset, offset + length, COPY_CHUNK):
            chunk = os.pread(src_fd, min(COPY_CHUNK, offset + length - at), at)
            if chunk.count(0) != len(chunk):
                os.pwrite(dst_fd, chunk, at)
    os.ftruncate(dst_fd, size)


def filesystem_type(path: str) -> str:
    """The type of the filesystem mounted at or above `path`, from /proc/self/mounts."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            mountpoint = fields[1].replace("\\040", " ")
            inside = real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) >= len(best):
                best, kind = mountpoint, fields[2]
    return kind


class ReflinkBackend(VolumeBackend):
    """Raw image files in `pool_dir`; reflink copies where the filesystem supports them."""

    name = "reflink"

    def __init__(self, pool_dir: str, change_block_size: int | None = None) -> None:
        """`change_block_size` coarsens changed ranges to that many bytes; None (the default) tells them
        to the pool filesystem's block."""
        if change_block_size is not None and (change_block_size <= 0 or change_block_size % 4096):
            raise ValueError("change_block_size must be a positive multiple of 4096")
        if not os.path.isdir(pool_dir):
            raise VolumeNotFound(f"pool directory {pool_dir} does not exist", pool=pool_dir)
        self.pool_dir = pool_dir
        self.change_block_size = change_block_size or os.statvfs(pool_dir).f_frsize
        self._reflink: bool | None = None

    # -- paths -------------------------------------------------------------

    def _path(self, handle: str) -> str:
        if is_snapshot(handle):
            volume, snap = parse_snapshot(handle)
            return os.path.join(self.pool_dir, f"{volume}@{snap}.snap")
        return os.path.join(self.pool_dir, f"{parse_volume(handle)}.img")

    def _existing(self, handle: str) -> str:
        path = self._path(handle)
        if not os.path.isfile(path):
            raise VolumeNotFound(f"{handle} does not exist in {self.pool_dir}", handle=handle)
        return path

    def _staging(self, final: str) -> str:
        return os.path.join(self.pool_dir, f".{os.path.basename(final)}.{secrets.token_hex(4)}.tmp")

    # -- reflink -----------------------------------------------------------

    @property
    def reflink_supported(self) -> bool:
        """Whether the pool's filesystem can reflink (probed once with two scratch files)."""
        if self._reflink is None:
            probe = self._staging(os.path.join(self.pool_dir, "probe"))
            try:
                with open(probe, "w+b") as src, open(probe + ".clone", "wb") as dst:
                    src.write(b"\0" * 4096)
                    src.flush()
                    self._reflink = self._try_clone(src.fileno(), dst.fileno())
            finally:
                for leftover in (probe, probe + ".clone"):
                    if os.path.exists(leftover):
                        os.unlink(leftover)
        return self._reflink

    @staticmethod
    def _try_clone(src_fd: int, dst_fd: int) -> bool:
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
        except OSError as exc:
            if exc.errno in NO_REFLINK_ERRNOS:
                return False
            raise
        return True

    def _copy(self, source: str, target: str) -> None:
        """Make `target` (which must not exist) a copy of `source`: reflink, or sparse copy."""
        staging = self._staging(target)
        try:
            with open(source, "rb") as src, open(staging, "xb") as dst:
                if self.reflink_supported:
                    fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
                else:
                    sparse_copy(src.fileno(), dst.fileno())
                os.fsync(dst.fileno())
            self._publish(staging, target)
        except OSError as exc:
            raise self._translate(exc, target) from exc
        finally:
            if os.path.exists(staging):
                os.unlink(staging)

    def _publish(self, staging: str, target: str) -> None:
        try:
            os.link(staging, target)
        except FileExistsError:
            raise VolumeExists(f"{os.path.basename(target)} already exists", path=target) from None

    @staticmethod
    def _translate(exc: OSError, path: str) -> Exception:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace(f"no space left for {os.path.basename(path)}", path=path)
        return exc

    # -- the interface -------------------------------------------------------

    def create(self, name: str, size_bytes: int) -> str:
        validate_size(size_bytes)
        path = self._path(validate_name(name))
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            raise VolumeExists(f"volume {name} already exists", volume=name) from None
        try:
            os.ftruncate(fd, size_bytes)
        finally:
            os.close(fd)
        return name

    def clone(self, source_handle: str, name: str) -> str:
        self._copy(self._existing(source_handle), self._path(validate_name(name)))
        return name

    def snapshot(self, handle: str, snap_name: str) -> str:
        snap = f"{parse_volume(handle)}@{validate_name(snap_name)}"
        target = self._path(snap)
        self._copy(self._existing(handle), target)
        os.chmod(target, 0o400)
        return snap

    def delete(self, handle: str) -> None:
        self._unlink(self._path(parse_volume(handle)))

    def delete_snapshot(self, snap_handle: str) -> None:
        parse_snapshot(snap_handle)
        self._unlink(self._path(snap_handle))

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def resize(self, handle: str, new_size_bytes: int, *, contents_fit: bool = False) -> None:
        validate_size(new_size_bytes)
        path = self._existing(parse_volume(handle))
        current = os.stat(path).st_size
        if new_size_bytes < current and not contents_fit:
            raise ShrinkRefused(
                f"{handle} is {current} bytes; shrinking to {new_size_bytes} needs the safe shrink",
                handle=handle, size=current, requested=new_size_bytes,
            )
        os.truncate(path, new_size_bytes)

    def size(self, handle: str) -> int:
        return os.stat(self._existing(handle)).st_size

    def exists(self, handle: str) -> bool:
        return os.path.isfile(self._path(handle))

    def changed_ranges(self, old_snap: str, new_handle: str) -> list[Range]:
        parse_snapshot(old_snap)
        with open(self._existing(old_snap), "rb") as old, open(self._existing(new_handle), "rb") as new:
            new_size = os.fstat(new.fileno()).st_size
            if self.reflink_supported:
                raw = changed_by_extents(
                    fiemap(old.fileno()), os.fstat(old.fileno()).st_size, fiemap(new.fileno()), new_size
                )
            else:
                raw = changed_by_comparison(old.fileno(), new.fileno(), self.change_block_size)
        return align_and_merge(raw, self.change_block_size, new_size)

    def path_for_export(self, handle: str) -> str:
        return self._existing(handle)

    def facts(self) -> dict[str, Any]:
        stat = os.statvfs(self.pool_dir)
        return {
            "backend": self.name,
            "pool": self.pool_dir,
            "filesystem": filesystem_type(self.pool_dir),
            "total_bytes": stat.f_blocks * stat.f_frsize,
            "free_bytes": stat.f_bavail * stat.f_frsize,
            "reflink": self.reflink_supported,
            "fallback": None if self.reflink_supported else "copy",
            "change_block_size": self.change_block_size,
        }

    def listing(self) -> dict[str, str]:
        """Handles of the pool's `<volume>.img` and `<volume>@<snapshot>.snap` files; staging dot-files and
        anything else in the directory are not volumes."""
        found = {}
        for entry in os.scandir(self.pool_dir):
            stem, dot, suffix = entry.name.rpartition(".")
            if entry.name.startswith(".") or not entry.is_file() or not dot or suffix not in ("img", "snap"):
                continue
            if (suffix == "snap") == is_snapshot(stem) and _valid_handle(stem):
                found[stem] = entry.path
        return found


def _valid_handle(handle: str) -> bool:
    try:
        parse_snapshot(handle) if is_snapshot(handle) else parse_volume(handle)
    except InvalidName:
        return False
    return True
