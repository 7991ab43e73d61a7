"""Backups of a volume (or snapshot) into a chunk store: full and differential, restore, verify, retention.

A full cuts the volume into fixed-size chunks (1 MiB by default) that the store packs into large
files (workers.san.packs), so it does not pay a file and an fsync per chunk. A chunk of
zeros is not stored (the manifest marks it `zero`); any other chunk is stored once, named by the
BLAKE3 digest of its bytes (four times SHA-256's speed with SHA-NI here; manifests before it used
SHA-256 and name their digest, which restore and verify follow) and compressed with zstd: level 1,
or a faster level for a chunk whose sample does not compress (random data), which costs no ratio
and most of the time. A differential reads only the backend's changed
ranges and makes chunks of just those bytes (cut at its parent's chunk grid); its manifest takes
everything else from the parent's, as whole chunks or slices of them (`at`, `size`) where a change
overwrote part of one, so it hashes, compresses and stores what changed and restoring any backup
needs its own manifest only. Holes (SEEK_DATA/SEEK_HOLE) are never read.

A small pool hashes, compresses and stores (blake3 and zstandard release the GIL). A full's
sequential reads run in volume order on reader threads, a few reads ahead of the pool, with
O_DIRECT in batches of neighbouring chunks into a few reused buffers where the file allows it
(FullReader); a differential's scattered reads run on the pool, several at once, the kernel asked
for them a window ahead (advised_ahead).

A manifest is the backup: it is published last, atomically, after the chunks it names are
durable. A cancelled or failed backup leaves no manifest, only chunks nobody references, which
`collect_garbage` removes.
"""

import bisect
import errno
import functools
import hashlib
import mmap
import operator
import os
import queue
import stat
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import blake3
import zstandard

from errors import BackupCancelled, BackupMismatch, ChunkCorrupt, ChunkMissing, InvalidRetention, LaxError
from workers.progress import Progress, ignore_progress
from workers.san.backend import Range, align_and_merge
from workers.san.chunks import ChunkStore
from workers.san.sparse import data_segments

# 2: entries may be slices of a chunk (`at`, `size`), as differentials since issue 17 write them.
FORMAT = 2
# A full's chunks: 1 MiB took about 10 % less machine CPU than 256 KiB in bench/backup.py (5.2-5.6 against
# 5.9-6.2 core-s: fewer chunks to sample, hash and hand over); a differential stores what changed whatever the size, as slices.
CHUNK_SIZE = 1024 * 1024
# A full hashed 2 GiB in 1.4 core-s with SHA-256 (SHA-NI) and 0.3 with BLAKE3 (bench/README). Each manifest
# names its digest; a differential extends only a parent of the same digest (else it is made as a full).
DIGEST = "blake3"
DIGESTS: dict[str, Callable[[bytes | memoryview], Any]] = {"sha256": hashlib.sha256, "blake3": blake3.blake3}
COMPRESSION = "zstd"
# Level 1, as Proxmox Backup Server stores its chunks: a full took about half the machine CPU of level 3 in
# bench/backup.py for 1 % more bytes on its mix (text alone: 40 % of its size instead of 36 %); bench/README.
ZSTD_LEVEL = 1
# A chunk whose first SAMPLE bytes shrink by less than a tenth at level 1 is incompressible: the
# fast level stores it at the same size in a fraction of the time.
FAST_LEVEL = -1
SAMPLE = 16 * 1024
INCOMPRESSIBLE = 0.9
# More threads than cores: a thread waiting for its chunk's fsync leaves the CPU to the others.
POOL_THREADS = 4
# Reads run at most this many chunks ahead of the pool, bounding memory to a few chunks.
IN_FLIGHT_PER_THREAD = 2
# O_DIRECT wants offsets and lengths in whole logical blocks: 4 KiB covers the disks we know of.
ALIGNMENT = 4096
# A full's direct reads take this many neighbouring chunks at once: 4 x 1 MiB reads were 10-20 %
# faster than one chunk a read in bench/backup.py's fulls (no read-ahead helps an O_DIRECT reader).
READ_BATCH = 4
# A full's reads run this many reads ahead of the pool on threads of their own, so the disk keeps reading
# while the pool catches up: 2.4-2.8 s a 2 GiB full against 2.7-3.3 s reading one at a time (bench/README).
READ_AHEAD = 2
# A differential asks the kernel for this many bytes of its scattered ranges ahead of the pool's reads.
ADVISE_AHEAD = 64 * 1024 * 1024
# A differential reads a grid cell whole rather than leave more entries than this in it.
MAX_PIECES = 16

StopCheck = Callable[[], bool]
Item = TypeVar("Item")


def chunk_digest(data: bytes | memoryview, algorithm: str) -> str:
    """The name of a chunk: the `algorithm` digest of its uncompressed bytes, in hex."""
    return DIGESTS[algorithm](data).hexdigest()


def digest_of(manifest: dict[str, Any]) -> str:
    """The digest a manifest's chunks are named by; BackupMismatch for one this version does not know."""
    algorithm = manifest.get("digest")
    if algorithm not in DIGESTS:
        raise BackupMismatch(f"backup {manifest.get('id')} names its chunks by an unknown digest {algorithm!r}",
                             backup=manifest.get("id"), digest=algorithm)
    return algorithm


@functools.lru_cache(maxsize=8)
def zeros(length: int) -> bytes:
    return bytes(length)


@functools.lru_cache(maxsize=8)
def zeros_digest(length: int, algorithm: str) -> str:
    return chunk_digest(zeros(length), algorithm)


def never_stop() -> bool:
    return False


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


# -- what to read -----------------------------------------------------------------


def intersect(spans: list[Range], start: int, end: int) -> list[Range]:
    """The parts of sorted, non-overlapping `spans` inside [start, end).

    Found by bisection: called once per chunk (or per changed range) over a volume's many spans,
    a scan of all spans each time would cost ranges x chunks."""
    parts = []
    for index in range(bisect.bisect_right(spans, start, key=lambda span: span[0] + span[1]), len(spans)):
        offset, length = spans[index]
        if offset >= end:
            break
        lo, hi = max(offset, start), min(offset + length, end)
        parts.append((lo, hi - lo))
    return parts


def chunk_length(entry: dict[str, Any]) -> int:
    """The uncompressed length of the chunk an entry names: the entry's own, unless it is a slice of a longer chunk."""
    return entry.get("size", entry["length"])


def piece_of(entry: dict[str, Any], start: int, end: int) -> dict[str, Any] | None:
    """The part of `entry` inside [start, end) as an entry of its own (a slice of the same chunk), or None."""
    lo, hi = max(entry["offset"], start), min(entry["offset"] + entry["length"], end)
    if lo >= hi:
        return None
    if (lo, hi) == (entry["offset"], entry["offset"] + entry["length"]):
        return entry
    piece: dict[str, Any] = {"offset": lo, "length": hi - lo}
    if "digest" not in entry:
        return {**piece, "zero": True}
    at = entry.get("at", 0) + lo - entry["offset"]
    whole = at == 0 and hi - lo == chunk_length(entry)
    return {**piece, "digest": entry["digest"], "stored": entry["stored"],
            **({} if whole else {"at": at, "size": chunk_length(entry)})}


def untouched(entry: dict[str, Any], changed: list[Range]) -> list[dict[str, Any]]:
    """The pieces of `entry` that none of the sorted `changed` ranges covers."""
    start, end = entry["offset"], entry["offset"] + entry["length"]
    pieces, cursor = [], start
    for offset, length in [*intersect(changed, start, end), (end, 0)]:
        if offset > cursor:
            pieces.append(piece_of(entry, cursor, offset))
        cursor = offset + length
    return pieces


def cut_around(entries: list[dict[str, Any]], changed: list[Range]) -> list[dict[str, Any]]:
    """The pieces of the sorted, tiling `entries` that none of the sorted `changed` ranges covers.

    Only the entries a change touches are cut (found by bisection); the rest are taken over by slices,
    as a differential's few changes leave most of a parent's thousands of entries as they are."""
    ends = [entry["offset"] + entry["length"] for entry in entries]
    touched = sorted({index for offset, length in changed
                      for index in range(bisect.bisect_right(ends, offset),
                                         min(bisect.bisect_left(ends, offset + length) + 1, len(entries)))})
    kept, after = [], 0
    for index in touched:
        kept.extend(entries[after:index])
        kept.extend(untouched(entries[index], changed))
        after = index + 1
    kept.extend(entries[after:])
    return kept


def split_at_cells(ranges: list[Range], chunk_size: int) -> list[Range]:
    """`ranges` cut where the chunk grid cuts, so each part lies in one cell (and makes one chunk)."""
    parts = []
    for offset, length in ranges:
        end = offset + length
        while offset < end:
            cut = min(end, (offset // chunk_size + 1) * chunk_size)
            parts.append((offset, cut - offset))
            offset = cut
    return parts


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk to make from the volume's bytes in [offset, offset + length); `spans` are its data
    (non-hole) parts, the only bytes read."""

    offset: int
    length: int
    spans: list[Range]

    @property
    def data_bytes(self) -> int:
        return sum(length for _, length in self.spans)


def plans_for(fd: int, size: int, pieces: list[Range]) -> list[ChunkPlan]:
    segments = list(data_segments(fd, size))
    return [ChunkPlan(offset, length, intersect(segments, offset, offset + length)) for offset, length in pieces]


def plan_full(fd: int, size: int, chunk_size: int) -> list[ChunkPlan]:
    """Every chunk of the volume, each read whole (its holes skipped)."""
    return plans_for(fd, size, split_at_cells([(0, size)], chunk_size))


def plan_differential(fd: int, size: int, chunk_size: int, parent: dict[str, Any],
                      ranges: list[Range]) -> tuple[list[ChunkPlan], list[dict[str, Any]]]:
    """What changed since `parent`, as (chunks to make of the changed ranges, the parent's entries cut
    around them). A changed range makes chunks of just its bytes (cut at the grid); the parent's chunks
    it overwrites part of stay referenced as slices, so a differential reads, hashes and stores what
    changed, nothing more. A grid cell that would hold more than MAX_PIECES entries is read whole
    into one chunk instead, which bounds a manifest at MAX_PIECES times a full's entries.

    Bytes past the parent's end count as changed; a shrunk volume cuts the parent's entries at its end."""
    old_size = parent["volume_size"]
    changed = align_and_merge([*ranges, *([(old_size, size - old_size)] if size > old_size else [])], 1, size)
    entries = parent["chunks"] if size >= old_size else [
        piece_of(entry, 0, size) for entry in parent["chunks"] if entry["offset"] < size]
    kept = cut_around(entries, changed)
    fresh = split_at_cells(changed, chunk_size)
    per_cell = Counter(offset // chunk_size for offset in [*(e["offset"] for e in kept), *(o for o, _ in fresh)])
    crowded = {cell for cell, count in per_cell.items() if count > MAX_PIECES}
    if crowded:
        kept = [entry for entry in kept if entry["offset"] // chunk_size not in crowded]
        fresh = sorted([*(piece for piece in fresh if piece[0] // chunk_size not in crowded),
                        *((cell * chunk_size, min(chunk_size, size - cell * chunk_size)) for cell in crowded)])
    return plans_for(fd, size, fresh), kept


def in_order(pool: Executor, work: Callable[[Item], Any], items: Iterable[Item],
             ahead: int) -> Iterator[tuple[Item, Any]]:
    """`(item, work(item))` for every item in item order, with up to `ahead` more items already submitted
    to `pool`; those not yet started are cancelled when the caller stops early (an error, a cancel)."""
    pending: deque[tuple[Item, Future]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(work, item)))
            if len(pending) > ahead:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        for _, future in pending:
            future.cancel()


def until_stopped(items: Iterable[Item], should_stop: StopCheck) -> Iterator[Item]:
    """`items`, raising BackupCancelled instead of the next one once `should_stop()` turns true."""
    for item in items:
        if should_stop():
            raise BackupCancelled("backup cancelled")
        yield item


# -- backup -----------------------------------------------------------------------


class ChunkReader:
    """Fetches, decompresses and checks chunks on pool threads; one zstd decompressor per thread."""

    def __init__(self, store: ChunkStore, algorithm: str) -> None:
        self.store = store
        self.algorithm = algorithm
        self.local = threading.local()

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        if not hasattr(self.local, "decompressor"):
            self.local.decompressor = zstandard.ZstdDecompressor()
        return self.local.decompressor

    def bytes_of(self, entry: dict[str, Any]) -> bytes:
        """The whole chunk's uncompressed bytes (also of a slice); ChunkMissing if absent, ChunkCorrupt if they do not hash to its name."""
        digest = entry["digest"]
        blob = self.store.get_chunk(digest)
        try:
            data = self._decompressor().decompress(blob, max_output_size=chunk_length(entry))
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(f"chunk {digest} does not decompress: {exc}", digest=digest) from None
        if len(data) != chunk_length(entry) or chunk_digest(data, self.algorithm) != digest:
            raise ChunkCorrupt(f"chunk {digest} does not match its digest", digest=digest)
        return data


def read_spans(fd: int, plan: ChunkPlan) -> bytes | bytearray:
    """A chunk-sized buffer with the chunk's data spans read into their places (zeros elsewhere)."""
    if not plan.spans:
        return zeros(plan.length)
    if plan.spans == [(plan.offset, plan.length)]:
        data = os.pread(fd, plan.length, plan.offset)
        if len(data) != plan.length:
            raise OSError(errno.EIO, f"short read at {plan.offset}: {len(data)} of {plan.length} bytes")
        return data
    data = bytearray(plan.length)
    view = memoryview(data)
    for offset, length in plan.spans:
        start = offset - plan.offset
        got = os.preadv(fd, [view[start:start + length]], offset)
        if got != length:
            raise OSError(errno.EIO, f"short read at {offset}: {got} of {length} bytes")
    return data


class FullReader:
    """A full's sequential reads, READ_AHEAD of them at once on the reader's threads. Chunks that are all
    data and block-aligned are read with O_DIRECT, up to READ_BATCH neighbours in one preadv, into
    page-aligned buffers reused once the pool is done with them; anything else (a chunk with holes, an
    unaligned end, a file system without O_DIRECT) goes through the page cache.

    Why: through the page cache every 4 KiB read takes a fresh page, reclaimed later, and this VM's
    host faults fresh pages in one by one: 2 GiB fulls took 3.2-6.3 s and 5.1-9.0 machine core-s
    that way, 3.0-3.3 s and 4.4-4.8 core-s direct in batches (bench/README). It also leaves the SAN's
    page cache to the guests' volumes."""

    def __init__(self, path: str, fd: int, plans: list[ChunkPlan], buffers: int) -> None:
        """`buffers`: how many chunks the caller holds at most; the reader adds those its reads ahead take,
        so a read never waits for a buffer that only a cancelled chunk would give back."""
        self.fd = fd
        self.plans = plans
        try:
            self.direct: int | None = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            self.direct = None
        self.free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        largest = max((plan.length for plan in plans), default=0)
        for _ in range(buffers + READ_BATCH * (READ_AHEAD + 1) if self.direct is not None and largest else 0):
            self.free.put(mmap.mmap(-1, largest))
        self.ahead = ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="backup-read")

    def close(self) -> None:
        """Wait for the reads under way (the rest are dropped), then close the direct descriptor they use."""
        self.ahead.shutdown(wait=True, cancel_futures=True)
        if self.direct is not None:
            os.close(self.direct)

    def _direct_ok(self, plan: ChunkPlan) -> bool:
        return (self.direct is not None and plan.spans == [(plan.offset, plan.length)]
                and plan.offset % ALIGNMENT == 0 and plan.length % ALIGNMENT == 0)

    def _batch_at(self, index: int) -> list[ChunkPlan]:
        """The plans from `index` on that one read takes: direct neighbours, each all data, or the one
        plan that goes through the cache."""
        batch = [self.plans[index]]
        if not self._direct_ok(batch[0]):
            return batch
        for following in self.plans[index + 1:index + READ_BATCH]:
            if following.offset != batch[-1].offset + batch[-1].length or not self._direct_ok(following):
                break
            batch.append(following)
        return batch

    def _read_direct(self, batch: list[ChunkPlan]) -> list[tuple[memoryview, Callable[[], None]]]:
        buffers = [self.free.get() for _ in batch]
        views = [memoryview(buffer)[:plan.length] for buffer, plan in zip(buffers, batch)]
        wanted = sum(plan.length for plan in batch)
        try:
            got = os.preadv(self.direct, views, batch[0].offset)
            if got != wanted:
                raise OSError(errno.EIO, f"short read at {batch[0].offset}: {got} of {wanted} bytes")
        except OSError:
            for buffer in buffers:
                self.free.put(buffer)
            raise
        return [(view, functools.partial(self.free.put, buffer)) for view, buffer in zip(views, buffers)]

    def _reads(self) -> Iterator[list[ChunkPlan]]:
        index = 0
        while index < len(self.plans):
            batch = self._batch_at(index)
            yield batch
            index += len(batch)

    def _read(self, batch: list[ChunkPlan]) -> list[tuple[bytes | bytearray | memoryview, Callable[[], None]]]:
        if self._direct_ok(batch[0]):
            return self._read_direct(batch)
        return [(read_spans(self.fd, batch[0]), lambda: None)]

    def chunks(self) -> Iterator[tuple[ChunkPlan, bytes | bytearray | memoryview, Callable[[], None]]]:
        """Every plan with its bytes and what to call once they are no longer needed, in plan order."""
        for batch, read in in_order(self.ahead, self._read, self._reads(), READ_AHEAD):
            for plan, (data, release) in zip(batch, read):
                yield plan, data, release


@dataclass
class Tally:
    """Counters shared by the reader and the pool (the lock guards the pool's updates)."""

    bytes_read: int = 0
    bytes_written: int = 0
    chunks_written: int = 0
    chunks_compressed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ChunkWriter:
    """Hashes (with `algorithm`, one of DIGESTS), compresses and stores chunks on pool threads; zstd compressors per thread."""

    def __init__(self, store: ChunkStore, tally: Tally, algorithm: str, level: int = ZSTD_LEVEL) -> None:
        self.store = store
        self.tally = tally
        self.algorithm = algorithm
        self.level = level
        self.local = threading.local()

    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        if not hasattr(self.local, "compressors"):
            self.local.compressors = {}
        if level not in self.local.compressors:
            self.local.compressors[level] = zstandard.ZstdCompressor(level=level)
        return self.local.compressors[level]

    def compress(self, data: bytes | bytearray) -> bytes:
        """`data` as one zstd frame: at the writer's level, or the fast level when a sample shows it does not compress."""
        sample = memoryview(data)[:SAMPLE]
        incompressible = len(self._compressor(1).compress(sample)) > INCOMPRESSIBLE * len(sample)
        return self._compressor(FAST_LEVEL if incompressible else self.level).compress(data)

    def entry_for(self, plan: ChunkPlan, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        """The manifest entry of one chunk, storing its bytes if the store lacks them."""
        entry: dict[str, Any] = {"offset": plan.offset, "length": plan.length}
        if not plan.spans:
            return {**entry, "zero": True}
        # Zeros are told by their digest: comparing a memoryview byte by byte costs more than hashing it.
        digest = chunk_digest(data, self.algorithm)
        if digest == zeros_digest(len(data), self.algorithm):
            return {**entry, "zero": True}
        packed = self.store.packed_size(digest)
        if packed is not None:
            return {**entry, "digest": digest, "stored": packed}
        # A chunk the store has only in a file of its own (from before packs) is compressed anyway: its
        # size is what tells a whole chunk from a torn one.
        blob = self.compress(data)
        with self.tally.lock:
            self.tally.chunks_compressed += 1
        if self.store.put_chunk(digest, blob):
            with self.tally.lock:
                self.tally.bytes_written += len(blob)
                self.tally.chunks_written += 1
        return {**entry, "digest": digest, "stored": len(blob)}

    def entry_of_volume(self, fd: int, plan: ChunkPlan) -> dict[str, Any]:
        """entry_for the chunk's bytes, read here from the volume."""
        return self.entry_for(plan, read_spans(fd, plan))

    def entry_then_release(self, plan: ChunkPlan, data: bytes | bytearray | memoryview,
                           release: Callable[[], None]) -> dict[str, Any]:
        """entry_for, then `release()` the buffer `data` lies in."""
        try:
            return self.entry_for(plan, data)
        finally:
            release()


def advised_ahead(fd: int, plans: list[ChunkPlan], window: int) -> Iterator[ChunkPlan]:
    """`plans`, with the kernel asked (POSIX_FADV_WILLNEED) to read their spans up to `window` bytes
    ahead of the plan handed out: the scattered reads of a differential then reach the disk all
    queued at once, not a few at a time as the pool's threads ask, and the pool finds them cached."""
    ahead = advised = 0  # plans[:ahead] are advised; `advised` bytes of them not handed out yet
    for index, plan in enumerate(plans):
        while ahead < len(plans) and (ahead <= index or advised < window):
            for offset, length in plans[ahead].spans:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            advised += plans[ahead].data_bytes
            ahead += 1
        advised -= plan.data_bytes
        yield plan


def run_pipeline(fd: int, plans: list[ChunkPlan], writer: ChunkWriter, on_progress: Progress,
                 should_stop: StopCheck, threads: int, *, sequential: FullReader | None) -> list[dict[str, Any]]:
    """Hand every planned chunk to the pool, return the entries in plan order. A full's chunks come
    from its `sequential` reader, in volume order; the scattered reads of a differential run on the
    pool, several at once and asked of the kernel ahead, as a disk serves them best."""
    total = sum(plan.data_bytes for plan in plans)
    if sequential is not None:
        jobs = ((plan, functools.partial(writer.entry_then_release, plan, data, release))
                for plan, data, release in sequential.chunks())
    else:
        jobs = ((plan, functools.partial(writer.entry_of_volume, fd, plan))
                for plan in advised_ahead(fd, plans, ADVISE_AHEAD))

    def counted(jobs: Iterable[tuple[ChunkPlan, Callable[[], dict[str, Any]]]]) -> Iterator[Callable[[], dict[str, Any]]]:
        for plan, work in jobs:
            writer.tally.bytes_read += plan.data_bytes
            on_progress(writer.tally.bytes_read, total)
            yield work

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="backup") as pool:
        return [entry for _, entry in in_order(pool, operator.call, until_stopped(counted(jobs), should_stop),
                                               threads * IN_FLIGHT_PER_THREAD)]


def tiled(entries: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """`entries` in volume order; BackupMismatch unless they cover the volume exactly once."""
    ordered = sorted(entries, key=lambda entry: entry["offset"])
    problems = layout_problems({"chunks": ordered, "volume_size": size})
    if problems:
        raise BackupMismatch(f"the backup's chunks do not tile the volume: {problems[0]}")
    return ordered


def stored_bytes(chunks: list[dict[str, Any]]) -> int:
    """Compressed bytes of the distinct chunks a manifest references."""
    return sum({entry["digest"]: entry["stored"] for entry in chunks if "digest" in entry}.values())


def backup_volume(source_path: str, size: int, store: ChunkStore, *, backup_id: str,
                  parent_manifest: dict[str, Any] | None = None, ranges: list[Range] | None = None,
                  chunk_size: int | None = None, snapshot: str | None = None,
                  on_progress: Progress = ignore_progress, should_stop: StopCheck = never_stop,
                  threads: int = POOL_THREADS, level: int = ZSTD_LEVEL) -> dict[str, Any]:
    """Back up the first `size` bytes of `source_path` (a snapshot nobody writes) into `store`
    and publish its manifest under `backup_id`; return the manifest.

    With `parent_manifest` and `ranges` (the changed ranges since the parent's snapshot) this
    is a differential that reads and stores only those ranges and references the rest of the
    volume as (slices of) the parent's chunks. `chunk_size` is the parent's (a differential cuts
    where its parent did) or else CHUNK_SIZE; `level` is zstd's for chunks that compress. A parent whose chunks
    are named by another digest (a backup made before BLAKE3) makes this a full. Raises BackupCancelled
    when `should_stop()` turns true (no manifest is published then).
    """
    if ranges is not None and parent_manifest is None:
        raise BackupMismatch("changed ranges need the parent backup they are relative to")
    if parent_manifest is not None and parent_manifest.get("digest") != DIGEST:
        # None of the parent's chunks can be reused under another digest's names: this backup is a full.
        parent_manifest = ranges = None
    if chunk_size is None:
        chunk_size = parent_manifest["chunk_size"] if parent_manifest is not None else CHUNK_SIZE
    if parent_manifest is not None and parent_manifest["chunk_size"] != chunk_size:
        raise BackupMismatch(f"parent {parent_manifest['id']} uses chunks of {parent_manifest['chunk_size']} bytes",
                             parent=parent_manifest["id"])
    started, clock = utc_now(), time.monotonic()
    differential = parent_manifest is not None and ranges is not None
    tally = Tally()
    with open(source_path, "rb") as source:
        fd = source.fileno()
        if not differential:
            # Doubles the kernel's read-ahead: a cold full read 4x faster on our loop-mounted XFS (bench/README).
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
        plans, kept = (plan_differential(fd, size, chunk_size, parent_manifest, ranges) if differential
                       else (plan_full(fd, size, chunk_size), []))
        reader = None if differential else FullReader(source_path, fd, plans, threads * IN_FLIGHT_PER_THREAD + 1)
        try:
            fresh = run_pipeline(fd, plans, ChunkWriter(store, tally, DIGEST, level), on_progress, should_stop, threads,
                                 sequential=reader)
        finally:
            if reader is not None:
                reader.close()
    chunks = tiled([*kept, *fresh], size)
    if should_stop():
        raise BackupCancelled("backup cancelled")
    manifest = {
        "format": FORMAT, "id": backup_id, "digest": DIGEST, "compression": COMPRESSION,
        "volume_size": size, "chunk_size": chunk_size, "chunks": chunks,
        "parent": parent_manifest["id"] if parent_manifest else None,
        "mode": "diff" if parent_manifest else "full", "snapshot": snapshot,
        "started_at": started, "finished_at": utc_now(), "seconds": round(time.monotonic() - clock, 3),
        "chunks_read": len(plans), "bytes_read": tally.bytes_read, "bytes_written": tally.bytes_written,
        "chunks_written": tally.chunks_written, "chunks_compressed": tally.chunks_compressed, "bytes_stored": stored_bytes(chunks),
        "data_bytes": sum(entry["length"] for entry in chunks if "digest" in entry),
    }
    store.put_manifest(backup_id, manifest)
    return manifest


# -- restore and verify -------------------------------------------------------------


def bounded_map(work: Callable[[Item], Any], items: list[Item], threads: int, should_stop: StopCheck,
                after_each: Callable[[Item, Any], None]) -> None:
    """Run `work` on every item in a pool with a few in flight, calling `after_each(item, result)`
    here in item order; stop with BackupCancelled when `should_stop()` turns true."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="backup") as pool:
        for item, result in in_order(pool, work, until_stopped(items, should_stop), threads * IN_FLIGHT_PER_THREAD):
            after_each(item, result)


def prepare_destination(fd: int, size: int) -> bool:
    """Make `fd` read as `size` zero bytes where that is free; return whether zero chunks must still be written.

    A regular file is emptied and re-grown, so zero chunks become holes (same inode: an export
    that holds the file open sees the restored bytes). A block device keeps its content, so
    zero chunks are written out."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        return False
    return True


def chunk_uses(entries: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Digest -> the entries that name that chunk (whole or a slice of it), both in volume order of first use."""
    uses: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if "digest" in entry:
            uses.setdefault(entry["digest"], []).append(entry)
    return uses


def distinct_chunks(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The first entry of each distinct stored chunk the manifest references, in volume order."""
    return [entries[0] for entries in chunk_uses(manifest.get("chunks", [])).values()]


def check_chunks_stored(store: ChunkStore, manifest: dict[str, Any], *,
                        should_stop: StopCheck = never_stop) -> None:
    """Raise ChunkMissing or ChunkCorrupt for the first chunk the backup needs that the store lacks or holds
    at another size than the manifest recorded (torn): one size look-up per chunk, before a restore writes."""
    for entry in distinct_chunks(manifest):
        if should_stop():
            raise BackupCancelled("cancelled")
        digest, where = entry["digest"], f"(offset {entry['offset']})"
        size = store.stored_size(digest)
        if size is None:
            raise ChunkMissing(f"chunk {digest} {where} is not in the store at {store.location}",
                               digest=digest, offset=entry["offset"])
        if size != entry["stored"]:
            raise ChunkCorrupt(f"chunk {digest} {where} is {size} bytes in the store at {store.location}, "
                               f"the backup recorded {entry['stored']}", digest=digest, offset=entry["offset"])


def restore_volume(store: ChunkStore, manifest: dict[str, Any], dest_path: str, *,
                   on_progress: Progress = ignore_progress, should_stop: StopCheck = never_stop,
                   threads: int = POOL_THREADS) -> dict[str, Any]:
    """Write the backup's bytes to `dest_path` (a file, made if missing, or a block device) bit for bit,
    leaving zero chunks as holes in a file; return what was written and how long it took.

    Every chunk is fetched once, however many places it fills, and checked against its digest before
    it is written (ChunkCorrupt, ChunkMissing). Raises BackupCancelled when `should_stop()` turns true; `dest_path` is then half restored."""
    clock = time.monotonic()
    size = manifest["volume_size"]
    reader = ChunkReader(store, digest_of(manifest))
    done = 0
    fd = os.open(dest_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        write_zeros = prepare_destination(fd, size)
        places = [*chunk_uses(manifest["chunks"]).values(),
                  *([entry] for entry in manifest["chunks"] if write_zeros and "digest" not in entry)]

        def write(entries: list[dict[str, Any]]) -> int:
            data = memoryview(reader.bytes_of(entries[0]) if "digest" in entries[0] else zeros(chunk_length(entries[0])))
            for entry in entries:
                at = entry.get("at", 0)
                os.pwrite(fd, data[at:at + entry["length"]], entry["offset"])
            return sum(entry["length"] for entry in entries)

        def advance(_: list[dict[str, Any]], written: int) -> None:
            nonlocal done
            done += written
            on_progress(done, size)

        bounded_map(write, places, threads, should_stop, advance)
        os.fsync(fd)
    finally:
        os.close(fd)
    on_progress(size, size)
    return {"bytes_written": done, "volume_size": size, "seconds": round(time.monotonic() - clock, 3)}


def layout_problems(manifest: dict[str, Any]) -> list[str]:
    """What makes a manifest incomplete: chunks that do not tile the volume, entries with neither digest nor
    zero, slices that run past their chunk."""
    problems = []
    cursor = 0
    for number, entry in enumerate(manifest.get("chunks", [])):
        if entry.get("offset") != cursor:
            problems.append(f"chunk {number}: starts at {entry.get('offset')}, expected {cursor}")
        if "digest" not in entry and not entry.get("zero"):
            problems.append(f"chunk {number} at offset {cursor}: neither a digest nor zero")
        elif "digest" in entry and entry.get("at", 0) + entry.get("length", 0) > chunk_length(entry):
            problems.append(f"chunk {number} at offset {cursor}: a slice past the end of its chunk")
        cursor = entry.get("offset", cursor) + entry.get("length", 0)
    if cursor != manifest.get("volume_size"):
        problems.append(f"chunks cover {cursor} bytes of a {manifest.get('volume_size')}-byte volume")
    return problems


def verify_backup(store: ChunkStore, manifest: dict[str, Any], *, on_progress: Progress = ignore_progress,
                  should_stop: StopCheck = never_stop, threads: int = POOL_THREADS) -> list[str]:
    """Re-read every chunk the backup references and re-hash it; return the problems found
    (empty: the backup is whole). Each problem names the chunk by digest and offset."""
    problems = layout_problems(manifest)
    unique = distinct_chunks(manifest)
    total = sum(chunk_length(entry) for entry in unique)
    reader = ChunkReader(store, digest_of(manifest))
    checked = 0

    def check(entry: dict[str, Any]) -> str | None:
        try:
            reader.bytes_of(entry)
        except LaxError as exc:
            return f"chunk {entry['digest']} at offset {entry['offset']}: {exc.code}: {exc.message}"
        return None

    def note(entry: dict[str, Any], problem: str | None) -> None:
        nonlocal checked
        checked += chunk_length(entry)
        if problem:
            problems.append(problem)
        on_progress(checked, total)

    bounded_map(check, unique, threads, should_stop, note)
    return problems


# -- retention and garbage collection --------------------------------------------------


def as_datetime(value: datetime | str) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "daily": lambda moment: (moment.year, moment.month, moment.day),
    "weekly": lambda moment: tuple(moment.isocalendar())[:2],
    "monthly": lambda moment: (moment.year, moment.month),
}


def newest_per_period(ordered: list[dict[str, Any]], period: Callable[[datetime], tuple[int, ...]],
                      count: int) -> Iterator[str]:
    """Ids of the newest backup in each of the `count` most recent periods that have one."""
    seen: set[tuple[int, ...]] = set()
    for backup in ordered:
        key = period(as_datetime(backup["created_at"]))
        if key not in seen:
            if len(seen) == count:
                return
            seen.add(key)
            yield backup["id"]


def with_ancestors(keep: set[str], parents: dict[str, str | None]) -> set[str]:
    """`keep` plus every backup a kept differential needs, up its parent chain."""
    closed = set()
    for backup_id in keep:
        while backup_id is not None and backup_id not in closed:
            closed.add(backup_id)
            backup_id = parents.get(backup_id)
    return closed


def retention_keep(backups: Iterable[dict[str, Any]], keep_last: int = 0, daily: int = 0, weekly: int = 0,
                   monthly: int = 0) -> set[str]:
    """Ids to keep from `backups` (dicts with `id`, `created_at`, `parent`): the newest `keep_last`,
    the newest of each of the last `daily` days, `weekly` ISO weeks and `monthly` months that have
    a backup, and every parent a kept differential needs. All counts zero keeps everything."""
    counts = {"keep_last": keep_last, "daily": daily, "weekly": weekly, "monthly": monthly}
    if any(not isinstance(n, int) or n < 0 for n in counts.values()):
        raise InvalidRetention(f"retention counts must be whole numbers >= 0: {counts}", **counts)
    ordered = sorted(backups, key=lambda b: as_datetime(b["created_at"]), reverse=True)
    if not any(counts.values()):
        return {b["id"] for b in ordered}
    keep = {b["id"] for b in ordered[:keep_last]}
    for name, period in PERIODS.items():
        keep.update(newest_per_period(ordered, period, counts[name]))
    return with_ancestors(keep, {b["id"]: b.get("parent") for b in ordered})


def collect_garbage(store: ChunkStore, kept_manifests: Iterable[dict[str, Any]], *,
                    on_progress: Progress = ignore_progress) -> dict[str, int]:
    """Delete every chunk of `store` that none of `kept_manifests` references; return counts.
    `on_progress(done, total)` follows the bytes of live chunks moved out of mostly dead packs.

    The caller makes sure no backup is writing to the store meanwhile: its new chunks are
    referenced by no manifest until it publishes one."""
    return store.collect({entry["digest"] for manifest in kept_manifests for entry in manifest["chunks"]
                          if "digest" in entry}, on_progress)
