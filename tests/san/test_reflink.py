"""The reflink backend on real XFS (reflink=1), btrfs and ext4 (the copy fallback), on loop devices."""

import ctypes
import hashlib
import mmap
import os
import random
from pathlib import Path

import pytest

from errors import InvalidName, ShrinkRefused, VolumeExists, VolumeNotFound
from workers.san.backend import align_and_merge
from workers.san.reflink import FIEMAP_EXTENT_UNWRITTEN, Extent, ReflinkBackend, changed_by_extents, fiemap, subtract

MiB = 1 << 20
BLOCK = 64 * 1024


def fill(path: str, offset: int, length: int) -> bytes:
    data = os.urandom(length)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return data


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def blocks_touched(writes: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The BLOCK-aligned ranges covering `writes`, computed by hand (block indices), merged."""
    indices = sorted({i for offset, length in writes for i in range(offset // BLOCK, (offset + length - 1) // BLOCK + 1)})
    ranges: list[list[int]] = []
    for i in indices:
        if ranges and ranges[-1][1] == i * BLOCK:
            ranges[-1][1] = (i + 1) * BLOCK
        else:
            ranges.append([i * BLOCK, (i + 1) * BLOCK])
    return [(start, min(end, size) - start) for start, end in ranges]


def write_direct(path: str, offsets: list[int]) -> None:
    """4 KiB of random bytes at each offset with O_DIRECT, as a guest's disk (cache=none) writes."""
    aligned = mmap.mmap(-1, 4096)  # O_DIRECT needs an aligned buffer
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for offset in offsets:
            aligned[:] = os.urandom(4096)
            os.pwritev(fd, [aligned], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def punch_hole(path: str, offset: int, length: int) -> None:
    """Deallocate a range (as a guest's discard does); it reads as zeros afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    keep_size_punch_hole = 0x01 | 0x02
    with open(path, "r+b") as f:
        if libc.fallocate(f.fileno(), keep_size_punch_hole, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            raise OSError(ctypes.get_errno(), "fallocate punch hole")


def rebuild(old_path: str, new_path: str, ranges: list[tuple[int, int]], out: Path) -> str:
    """Copy of old, sized like new, with `ranges` read from new: what a differential restore does."""
    out.write_bytes(Path(old_path).read_bytes())
    os.truncate(out, os.path.getsize(new_path))
    with open(new_path, "rb") as src, open(out, "r+b") as dst:
        for offset, length in ranges:
            dst.seek(offset)
            dst.write(os.pread(src.fileno(), length, offset))
    return sha256(str(out))


@pytest.mark.integration
def test_facts_tell_reflink_or_copy_fallback(pool_dir: Path) -> None:
    facts = ReflinkBackend(str(pool_dir)).facts()
    on_ext4 = facts["filesystem"] == "ext4"
    assert facts["filesystem"] in {"xfs", "btrfs", "ext4"}
    assert facts["reflink"] is not on_ext4
    assert facts["fallback"] == ("copy" if on_ext4 else None)
    assert 0 < facts["free_bytes"] <= facts["total_bytes"]
    assert [p.name for p in pool_dir.iterdir() if p.name.startswith(".")] == []


@pytest.mark.integration
def test_volume_lifecycle(pool_dir: Path) -> None:
    backend = ReflinkBackend(str(pool_dir))
    vol = backend.create("web-1", 8 * MiB)
    assert backend.exists(vol) and backend.size(vol) == 8 * MiB
    assert os.stat(backend.path_for_export(vol)).st_blocks == 0, "a new volume is sparse"
    with pytest.raises(VolumeExists):
        backend.create("web-1", 8 * MiB)

    backend.resize(vol, 16 * MiB)
    assert backend.size(vol) == 16 * MiB
    with pytest.raises(ShrinkRefused):
        backend.resize(vol, 4 * MiB)
    assert backend.size(vol) == 16 * MiB

    backend.delete(vol)
    backend.delete(vol)
    assert not backend.exists(vol)
    with pytest.raises(VolumeNotFound):
        backend.size(vol)


@pytest.mark.integration
def test_clone_and_snapshot_copy_content_and_share_blocks_where_reflink_works(pool_dir: Path) -> None:
    backend = ReflinkBackend(str(pool_dir))
    template = backend.create("tiny", 8 * MiB)
    fill(backend.path_for_export(template), 0, 4 * MiB)
    clone = backend.clone(template, "vm-1")
    snap = backend.snapshot(clone, "before")
    assert snap == "vm-1@before"
    assert sha256(backend.path_for_export(clone)) == sha256(backend.path_for_export(template))
    assert sha256(backend.path_for_export(snap)) == sha256(backend.path_for_export(template))
    with pytest.raises(VolumeExists):
        backend.clone(template, "vm-1")

    with open(backend.path_for_export(template), "rb") as a, open(backend.path_for_export(clone), "rb") as b:
        physical_a = {e.physical for e in fiemap(a.fileno())}
        physical_b = {e.physical for e in fiemap(b.fileno())}
    shared = bool(physical_a & physical_b)
    assert shared == backend.facts()["reflink"]

    backend.delete_snapshot(snap)
    backend.delete_snapshot(snap)
    assert not backend.exists(snap) and backend.exists(clone)


@pytest.mark.integration
def test_changed_ranges_are_exactly_the_written_blocks_and_rebuild_the_new_snapshot(pool_dir: Path, tmp_path: Path) -> None:
    backend = ReflinkBackend(str(pool_dir), change_block_size=BLOCK)
    template = backend.create("tpl", 16 * MiB)
    fill(backend.path_for_export(template), 0, 6 * MiB)
    vol = backend.clone(template, "vm-2")
    old = backend.snapshot(vol, "s1")

    path = backend.path_for_export(vol)
    writes = [
        (4096, 4096),                    # inside block 0
        (3 * BLOCK + 8192, 2 * BLOCK),   # across blocks 3, 4, 5
        (5 * MiB, 4096),                 # inside the data the template had
        (10 * MiB, 100 * 1024),          # into what was a hole
    ]
    for offset, length in writes:
        fill(path, offset, length)
    punch = (2 * MiB, BLOCK)  # a discard: data becomes a hole
    punch_hole(path, *punch)
    backend.resize(vol, 20 * MiB)
    fill(path, 18 * MiB, 4096)       # past the old end
    writes += [punch, (18 * MiB, 4096)]
    new = backend.snapshot(vol, "s2")

    ranges = backend.changed_ranges(old, new)
    assert ranges == blocks_touched(writes, 20 * MiB)
    assert rebuild(backend.path_for_export(old), backend.path_for_export(new), ranges, tmp_path / "rebuilt") == sha256(
        backend.path_for_export(new)
    )
    assert backend.changed_ranges(new, vol) == [], "nothing written since s2"
    assert backend.changed_ranges(old, old) == []


@pytest.mark.integration
def test_a_4k_write_is_a_4k_change(pool_dir: Path, tmp_path: Path) -> None:
    """Changes are told at the filesystem's block: FIEMAP on XFS and btrfs (XFS's CoW extent size hint
    reserves 32 blocks per write, yet maps only the written one), the byte comparison on ext4."""
    backend = ReflinkBackend(str(pool_dir))
    vol = backend.create("vm-4k", 16 * MiB)
    path = backend.path_for_export(vol)
    fill(path, 0, 8 * MiB)
    old = backend.snapshot(vol, "s1")
    # Every other block, so no two writes touch: into data and into holes alike.
    offsets = sorted(2 * 4096 * k for k in random.Random(5).sample(range(16 * MiB // 8192), 40))
    write_direct(path, offsets)
    new = backend.snapshot(vol, "s2")

    ranges = backend.changed_ranges(old, new)
    assert backend.change_block_size == os.statvfs(pool_dir).f_frsize <= 4096  # the test's small ext4 has 1 KiB blocks
    assert ranges == [(offset, 4096) for offset in offsets]
    assert rebuild(backend.path_for_export(old), backend.path_for_export(new), ranges, tmp_path / "rebuilt") == sha256(
        backend.path_for_export(new)
    )


@pytest.mark.integration
def test_names_never_reach_a_path_unvalidated(xfs_dir: Path) -> None:
    backend = ReflinkBackend(str(xfs_dir))
    for bad in ["../etc", "a/b", "", "UPPER", "x" * 64, "-lead", "a@b@c", "vol.img"]:
        with pytest.raises(InvalidName):
            backend.create(bad, MiB)
    with pytest.raises(InvalidName):
        backend.changed_ranges("not-a-snapshot", "vol")
    assert list(xfs_dir.iterdir()) == []


def test_extent_comparison_trusts_only_same_place_same_kind() -> None:
    k = 4096
    old = [Extent(0, 100 * k, 8 * k, 0), Extent(8 * k, 500 * k, 8 * k, 0)]
    new = [
        Extent(0, 100 * k, 2 * k, 0),          # still shared
        Extent(2 * k, 900 * k, 1 * k, 0),      # rewritten
        Extent(3 * k, 103 * k, 5 * k, 0),      # shared again (XFS split the old extent)
        Extent(8 * k, 500 * k, 4 * k, FIEMAP_EXTENT_UNWRITTEN),  # same place, different kind
        Extent(20 * k, 700 * k, 1 * k, 0),     # was a hole
    ]
    changed = changed_by_extents(old, 16 * k, new, 24 * k)
    assert changed == [(2 * k, k), (8 * k, 8 * k), (20 * k, k)]


def test_range_helpers() -> None:
    assert subtract([(0, 100)], [(10, 10), (50, 60)]) == [(0, 10), (20, 30)]
    assert align_and_merge([(70, 10), (0, 1), (130, 0)], 64, 100) == [(0, 100)]
    assert align_and_merge([(200, 1), (0, 1)], 64, 1000) == [(0, 64), (192, 64)]
