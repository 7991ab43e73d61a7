"""Backups of a volume (or snapshot) into a chunk store: full and differential, restore, verify, retention.

The volume is cut into fixed-size chunks, 256 KiB by default: small enough that a differential
after scattered writes rebuilds little more than what changed, while the store packs them into
large files (workers.san.packs) so a full does not pay a file and an fsync per chunk. A chunk of
zeros is not stored (the manifest marks it `zero`); any other chunk is stored once, named by the
SHA-256 digest of its bytes (hardware-accelerated on current CPUs, twice BLAKE2b's speed here) and
compressed with zstd: level 1, or a faster level for a chunk whose sample does not compress (random
data), which costs no ratio and most of the time. A differential keeps its parent's chunk size,
reads only the chunks that the backend's changed ranges touch and takes every other chunk entry
from its parent's manifest, so restoring any backup needs its own manifest only. Holes
(SEEK_DATA/SEEK_HOLE) are never read.

Reading stays on the calling thread while a small pool hashes, compresses and stores
(hashlib and zstandard release the GIL), so reads overlap the CPU work.

A manifest is the backup: it is published last, atomically, after the chunks it names are
durable. A cancelled or failed backup leaves no manifest, only chunks nobody references, which
`collect_garbage` removes.
"""

import bisect
import errno
import functools
import hashlib
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import zstandard

from errors import BackupCancelled, BackupMismatch, ChunkCorrupt, ChunkMissing, InvalidRetention, LaxError
from workers.progress import Progress, ignore_progress
from workers.san.backend import Range, align_and_merge
from workers.san.chunks import ChunkStore
from workers.san.sparse import data_segments

FORMAT = 1
CHUNK_SIZE = 256 * 1024
DIGEST = "sha256"
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

StopCheck = Callable[[], bool]


def chunk_digest(data: bytes | memoryview) -> str:
    """The name of a chunk: SHA-256 of its uncompressed bytes, in hex."""
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=8)
def zeros(length: int) -> bytes:
    return bytes(length)


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


def chunks_touched(ranges: Iterable[Range], chunk_size: int, size: int) -> set[int]:
    """Indexes of the chunks any of `ranges` overlaps."""
    touched: set[int] = set()
    for offset, length in ranges:
        if length > 0 and offset < size:
            last = min(offset + length, size) - 1
            touched.update(range(offset // chunk_size, last // chunk_size + 1))
    return touched


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk to (re)make: its bytes are `base` (the parent's chunk entry, None: zeros) with the
    `fresh` spans replaced by what the volume holds there; `spans` are the data (non-hole) parts of
    `fresh`, the only bytes read."""

    index: int
    offset: int
    length: int
    fresh: list[Range]
    spans: list[Range]
    base: dict[str, Any] | None = None


def plan_full(fd: int, size: int, chunk_size: int) -> list[ChunkPlan]:
    """Every chunk of the volume, each read whole (its holes skipped)."""
    segments = list(data_segments(fd, size))
    plans = []
    for offset in range(0, size, chunk_size):
        length = min(chunk_size, size - offset)
        plans.append(ChunkPlan(offset // chunk_size, offset, length, [(offset, length)],
                               intersect(segments, offset, offset + length)))
    return plans


def plan_differential(fd: int, size: int, chunk_size: int, parent: dict[str, Any],
                      ranges: list[Range]) -> list[ChunkPlan]:
    """The chunks that changed since `parent`: each its parent chunk with the changed ranges read over it.

    Bytes past the parent's end count as changed; when the size changed, the new last chunk is
    remade too (its length differs)."""
    old_size = parent["volume_size"]
    changed = align_and_merge([*ranges, *([(old_size, size - old_size)] if size > old_size else [])], 1, size)
    dirty = chunks_touched(changed, chunk_size, size)
    if old_size != size:
        dirty.add((size - 1) // chunk_size)
    inherited = {entry["offset"]: entry for entry in parent["chunks"]}
    segments = list(data_segments(fd, size))
    plans = []
    for index in sorted(dirty):
        offset = index * chunk_size
        length = min(chunk_size, size - offset)
        fresh = intersect(changed, offset, offset + length)
        spans = [span for start, n in fresh for span in intersect(segments, start, start + n)]
        whole = sum(n for _, n in fresh) == length
        base = inherited.get(offset)
        plans.append(ChunkPlan(index, offset, length, fresh, spans,
                               None if whole or base is None or "digest" not in base else base))
    return plans


# -- backup -----------------------------------------------------------------------


class ChunkReader:
    """Fetches, decompresses and checks chunks on pool threads; one zstd decompressor per thread."""

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self.local = threading.local()

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        if not hasattr(self.local, "decompressor"):
            self.local.decompressor = zstandard.ZstdDecompressor()
        return self.local.decompressor

    def bytes_of(self, entry: dict[str, Any]) -> bytes:
        """The chunk's uncompressed bytes; ChunkMissing if absent, ChunkCorrupt if they do not hash to its name."""
        digest = entry["digest"]
        blob = self.store.get_chunk(digest)
        try:
            data = self._decompressor().decompress(blob, max_output_size=entry["length"])
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(f"chunk {digest} does not decompress: {exc}", digest=digest) from None
        if len(data) != entry["length"] or chunk_digest(data) != digest:
            raise ChunkCorrupt(f"chunk {digest} does not match its digest", digest=digest)
        return data


@dataclass
class Tally:
    """Counters shared by the reader and the pool (the lock guards the pool's updates)."""

    bytes_read: int = 0
    bytes_written: int = 0
    chunks_written: int = 0
    chunks_compressed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ChunkWriter:
    """Assembles, hashes, compresses and stores chunks on pool threads; zstd compressors per thread."""

    def __init__(self, store: ChunkStore, tally: Tally, level: int = ZSTD_LEVEL) -> None:
        self.store = store
        self.tally = tally
        self.level = level
        self.reader = ChunkReader(store)
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

    def assemble(self, plan: ChunkPlan, fresh: bytes | bytearray) -> bytes | bytearray:
        """The chunk's bytes: `fresh` (the read bytes at their places, zeros elsewhere) alone, or laid
        over the parent's chunk (cut or zero-padded to length) in the fresh spans."""
        if plan.base is None:
            return fresh
        data = bytearray(self.reader.bytes_of(plan.base)[: plan.length].ljust(plan.length, b"\0"))
        for offset, length in plan.fresh:
            start = offset - plan.offset
            data[start:start + length] = fresh[start:start + length]
        return data

    def entry_for(self, plan: ChunkPlan, fresh: bytes | bytearray) -> dict[str, Any]:
        """The manifest entry of one chunk, storing its bytes if the store lacks them."""
        entry: dict[str, Any] = {"offset": plan.offset, "length": plan.length}
        if not plan.spans and plan.base is None:
            return {**entry, "zero": True}
        data = self.assemble(plan, fresh)
        if data == zeros(len(data)):
            return {**entry, "zero": True}
        digest = chunk_digest(data)
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


def read_spans(fd: int, plan: ChunkPlan) -> bytes | bytearray:
    """A chunk-sized buffer with the chunk's data spans read into their places (zeros elsewhere)."""
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


def run_pipeline(fd: int, plans: list[ChunkPlan], writer: ChunkWriter, on_progress: Progress,
                 should_stop: StopCheck, threads: int) -> list[dict[str, Any]]:
    """Read every planned chunk here, hand it to the pool, return the entries in plan order."""
    total = sum(n for plan in plans for _, n in plan.spans)
    pending: deque[Future] = deque()
    entries: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="backup") as pool:
        try:
            for plan in plans:
                if should_stop():
                    raise BackupCancelled("backup cancelled")
                fresh = read_spans(fd, plan)
                writer.tally.bytes_read += sum(n for _, n in plan.spans)
                pending.append(pool.submit(writer.entry_for, plan, fresh))
                while len(pending) > threads * IN_FLIGHT_PER_THREAD:
                    entries.append(pending.popleft().result())
                on_progress(writer.tally.bytes_read, total)
            entries.extend(future.result() for future in pending)
        finally:
            for future in pending:
                future.cancel()
    return entries


def merge_entries(parent: dict[str, Any] | None, fresh: list[dict[str, Any]], chunk_size: int,
                  size: int) -> list[dict[str, Any]]:
    """The full chunk list: `fresh` entries where read, the parent's entries everywhere else."""
    by_offset = {entry["offset"]: entry for entry in fresh}
    inherited = {entry["offset"]: entry for entry in (parent or {}).get("chunks", [])}
    merged = []
    for offset in range(0, size, chunk_size):
        entry = by_offset.get(offset) or inherited.get(offset)
        if entry is None:
            raise BackupMismatch(f"no chunk for offset {offset}: neither read nor in the parent", offset=offset)
        merged.append(entry)
    return merged


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
    is a differential that reads only those ranges and takes the rest of each chunk they touch
    from the parent's chunk in the store. `chunk_size` is the parent's (a differential must cut
    where its parent did) or else CHUNK_SIZE; `level` is zstd's for chunks that compress. Raises BackupCancelled
    when `should_stop()` turns true (no manifest is published then).
    """
    if ranges is not None and parent_manifest is None:
        raise BackupMismatch("changed ranges need the parent backup they are relative to")
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
        plans = (plan_differential(fd, size, chunk_size, parent_manifest, ranges) if differential
                 else plan_full(fd, size, chunk_size))
        fresh = run_pipeline(fd, plans, ChunkWriter(store, tally, level), on_progress, should_stop, threads)
    chunks = merge_entries(parent_manifest if differential else None, fresh, chunk_size, size)
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


def bounded_map(work: Callable[[dict[str, Any]], Any], entries: list[dict[str, Any]], threads: int,
                should_stop: StopCheck, after_each: Callable[[dict[str, Any], Any], None]) -> None:
    """Run `work` on every entry in a pool with a few in flight, calling `after_each(entry, result)`
    here in entry order; stop with BackupCancelled when `should_stop()` turns true."""
    pending: deque[tuple[dict[str, Any], Future]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="backup") as pool:
        try:
            for entry in entries:
                if should_stop():
                    raise BackupCancelled("cancelled")
                pending.append((entry, pool.submit(work, entry)))
                while len(pending) > threads * IN_FLIGHT_PER_THREAD:
                    done, future = pending.popleft()
                    after_each(done, future.result())
            while pending:
                done, future = pending.popleft()
                after_each(done, future.result())
        finally:
            for _, future in pending:
                future.cancel()


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


def distinct_chunks(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The first entry of each distinct stored chunk the manifest references, in volume order."""
    first_use: dict[str, dict[str, Any]] = {}
    for entry in manifest.get("chunks", []):
        if "digest" in entry:
            first_use.setdefault(entry["digest"], entry)
    return list(first_use.values())


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

    Every chunk is checked against its digest before it is written (ChunkCorrupt, ChunkMissing).
    Raises BackupCancelled when `should_stop()` turns true; `dest_path` is then half restored."""
    clock = time.monotonic()
    size = manifest["volume_size"]
    reader = ChunkReader(store)
    done = 0
    fd = os.open(dest_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        write_zeros = prepare_destination(fd, size)
        entries = [e for e in manifest["chunks"] if "digest" in e or write_zeros]

        def write(entry: dict[str, Any]) -> int:
            data = reader.bytes_of(entry) if "digest" in entry else bytes(entry["length"])
            os.pwrite(fd, data, entry["offset"])
            return len(data)

        def advance(entry: dict[str, Any], written: int) -> None:
            nonlocal done
            done += written
            on_progress(done, size)

        bounded_map(write, entries, threads, should_stop, advance)
        os.fsync(fd)
    finally:
        os.close(fd)
    on_progress(size, size)
    return {"bytes_written": done, "volume_size": size, "seconds": round(time.monotonic() - clock, 3)}


def layout_problems(manifest: dict[str, Any]) -> list[str]:
    """What makes a manifest incomplete: chunks that do not tile the volume, entries with neither digest nor zero."""
    problems = []
    cursor = 0
    for number, entry in enumerate(manifest.get("chunks", [])):
        if entry.get("offset") != cursor:
            problems.append(f"chunk {number}: starts at {entry.get('offset')}, expected {cursor}")
        if "digest" not in entry and not entry.get("zero"):
            problems.append(f"chunk {number} at offset {cursor}: neither a digest nor zero")
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
    total = sum(entry["length"] for entry in unique)
    reader = ChunkReader(store)
    checked = 0

    def check(entry: dict[str, Any]) -> str | None:
        try:
            reader.bytes_of(entry)
        except LaxError as exc:
            return f"chunk {entry['digest']} at offset {entry['offset']}: {exc.code}: {exc.message}"
        return None

    def note(entry: dict[str, Any], problem: str | None) -> None:
        nonlocal checked
        checked += entry["length"]
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
