"""Where backups live: chunks packed into pack files, an index of where each is, one JSON manifest per backup.

A store only keeps blobs; it does not know how they were made. Chunks are named by the
hex digest of their uncompressed bytes and hold those bytes compressed (zstd, by
workers.san.backup). A backup's chunks are gathered into packs of about 32 MiB
(workers.san.packs), each written with one fsync; when the backup publishes its manifest the
store first writes the packs' index, so a chunk a manifest names is on disk before the manifest
is. Every file is written atomically and durably (a temporary file, synced, renamed into place,
its directory synced), so a reader never sees half a pack, index or manifest; a crash leaves at
most a stray temporary file (`*.tmp`) or a pack no index names, which garbage collection removes.

Layout of a `LocalStore(path)`:
    packs/<pack id>.pack               compressed chunks back to back
    index/<index id>.json              per pack: digest, offset and length of each chunk
    manifests/<backup id>.json
    chunks/<first 2 hex digits>/<digest>.zst
                                       one file per chunk, as stores were written before packs:
                                       read, verified and collected, never written any more
"""

import json
import logging
import os
import re
import secrets
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from errors import ChunkMissing, InvalidStoreName, ManifestNotFound
from workers.progress import Progress, ignore_progress
from workers.san.packs import (PACK_TARGET, Blob, Pack, PackBuffer, PackIndex, decode_index, encode_index,
                               index_relpath, new_id, pack_relpath)

DIGEST_RE = re.compile(r"[0-9a-f]{16,128}")
BACKUP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TEMP_SUFFIX = ".tmp"
# A pack with more than this share of its bytes unreferenced is rewritten by garbage collection; one
# with less keeps its dead bytes (rewriting a mostly live pack to free a little costs more than it frees).
REPACK_DEAD_SHARE = 0.25
STORE_DIRECTORIES = ("packs", "index", "manifests")
QUEUED_PACKS = 2

log = logging.getLogger(__name__)


def check_digest(digest: str) -> str:
    """Return `digest` if it is lowercase hex of a plausible length; it becomes part of a path."""
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise InvalidStoreName(f"invalid chunk digest {digest!r}", digest=digest)
    return digest


def check_backup_id(backup_id: str) -> str:
    """Return `backup_id` if it is safe as a file name (no slashes, no leading dot)."""
    if not isinstance(backup_id, str) or not BACKUP_ID_RE.fullmatch(backup_id):
        raise InvalidStoreName(f"invalid backup id {backup_id!r}", backup_id=backup_id)
    return backup_id


def chunk_relpath(digest: str) -> str:
    digest = check_digest(digest)
    return f"chunks/{digest[:2]}/{digest}.zst"


def manifest_relpath(backup_id: str) -> str:
    return f"manifests/{check_backup_id(backup_id)}.json"


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def temp_name(final: str) -> str:
    """A name beside `final` to write into before the rename; a crash leaves it as a stray `*.tmp`."""
    return f"{final}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


class ChunkStore(ABC):
    """The interface backup, restore, verify and garbage collection use.

    `put_*` are idempotent: putting a chunk the store holds whole is a no-op (same digest, same bytes).
    `delete_*` of something missing succeeds. `get_*` raise ChunkMissing / ManifestNotFound.
    A store object belongs to one job: its pool threads may put and get concurrently.

    The interface is written once here over a few file operations on paths relative to the
    store's root, which each kind of store implements (`_size`, `_sizes`, `_read`, `_read_range`,
    `_write_atomically`, `_sync_directory`, `_remove`, `_listdir`); `location` names the store in errors.
    """

    location: str

    def __init__(self, pack_target: int = PACK_TARGET) -> None:
        self._buffer = PackBuffer(pack_target)
        self._index: PackIndex | None = None
        self._written: dict[str, list[Blob]] = {}
        self._lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        self._writes: deque[Future] = deque()
        self._loose: bool | None = None

    @abstractmethod
    def _size(self, relpath: str) -> int | None:
        """The file's size, or None if it does not exist."""

    @abstractmethod
    def _sizes(self, relpath: str) -> dict[str, int]:
        """Name -> size of the files in the directory (none if it does not exist)."""

    @abstractmethod
    def _read(self, relpath: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""

    @abstractmethod
    def _read_range(self, relpath: str, offset: int, length: int) -> bytes | None:
        """Up to `length` bytes of the file from `offset` (fewer if it ends sooner), or None if it does not exist."""

    @abstractmethod
    def _write_atomically(self, relpath: str, parts: Sequence[bytes], *, sync_directory: bool = True) -> None:
        """Make the file hold `parts` back to back, all at once: a reader sees the old file or the new, never part.
        The parts are written one after another, never joined (a pack's join cost more CPU than its writes).
        Without `sync_directory` the new name is durable only after `_sync_directory` of its directory."""

    @abstractmethod
    def _sync_directory(self, relpath: str) -> None:
        """Make the directory's entries (new names, renames) durable."""

    @abstractmethod
    def _remove(self, relpath: str) -> None:
        """Delete the file; a missing one is no error."""

    @abstractmethod
    def _remove_directory(self, relpath: str) -> None:
        """Remove an empty directory (nothing if it is gone)."""

    @abstractmethod
    def _listdir(self, relpath: str) -> list[str]:
        """Names in the directory (none if it does not exist)."""

    # -- chunks ---------------------------------------------------------------------------

    def index(self) -> PackIndex:
        """Where each packed chunk is; read from the index files once, then kept up to date by this store's writes."""
        if self._index is None:
            self._index = self._load_index()
        return self._index

    def _load_index(self) -> PackIndex:
        files = [self._read(index_relpath(index_id)) for index_id in self._index_ids()]
        return PackIndex.from_files([decode_index(data) for data in files if data is not None], self._pack_sizes())

    def _index_ids(self) -> list[str]:
        return [name[: -len(".json")] for name in self._listdir("index") if name.endswith(".json")]

    def _pack_sizes(self) -> dict[str, int]:
        return {name[: -len(".pack")]: size for name, size in self._sizes("packs").items() if name.endswith(".pack")}

    def _has_loose_chunks(self) -> bool:
        """Whether the store has chunks from before packs (looked up once: nothing writes them any more)."""
        if self._loose is None:
            self._loose = bool(self._listdir("chunks"))
        return self._loose

    def _loose_digests(self) -> Iterator[str]:
        for prefix in sorted(self._listdir("chunks")):
            for name in sorted(self._listdir(f"chunks/{prefix}")):
                if name.endswith(".zst"):
                    yield name[: -len(".zst")]

    def locate(self, digest: str) -> tuple[str, int, int] | None:
        """Where the chunk's stored bytes are: (path relative to the store, offset, length), or None."""
        where = self.index().get(check_digest(digest))
        if where is not None:
            return where.relpath, where.offset, where.length
        if not self._has_loose_chunks():
            return None
        size = self._size(chunk_relpath(digest))
        return None if size is None else (chunk_relpath(digest), 0, size)

    def stored_size(self, digest: str) -> int | None:
        """The chunk's size in the store (compressed), or None if the store does not have it."""
        packed = self.packed_size(digest)
        if packed is not None or not self._has_loose_chunks():
            return packed
        return self._size(chunk_relpath(digest))

    def packed_size(self, digest: str) -> int | None:
        """The size of the chunk's copy in a pack (the one being filled, or one indexed whose pack is long
        enough), or None. Such a copy is whole, so a backup that finds one need not even compress the chunk."""
        pending = self._buffer.pending(digest)
        if pending is not None:
            return len(pending)
        where = self.index().get(check_digest(digest))
        return None if where is None else where.length

    def has_chunk(self, digest: str) -> bool:
        return self.stored_size(digest) is not None

    def put_chunk(self, digest: str, blob: bytes) -> bool:
        """Store the chunk unless the store holds it whole; return whether it was written.

        Whole means exactly `len(blob)` bytes: the same bytes compress to the same blob, so a chunk of
        another size is torn (a loose chunk cut short on a store that did not sync) and is written again.
        Bit rot of the right size is what verify is for. The chunk goes into the pack being filled;
        `flush` (or `put_manifest`) makes it durable."""
        if self.stored_size(check_digest(digest)) == len(blob):
            return False
        self._pack(digest, blob)
        return True

    def _pack(self, digest: str, blob: bytes) -> None:
        full = self._buffer.add(digest, blob)
        if full is not None:
            self._queue_write(full)

    def _queue_write(self, pack: Pack) -> None:
        """Write the pack on the store's writer thread: a backup's pool thread that filled it goes on
        at once instead of waiting for the fsync (and the backup's reader for that thread). At most
        QUEUED_PACKS wait, bounding memory; a failed write raises here, in the next chunk's thread."""
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-writer")
            while self._writes and self._writes[0].done():
                self._writes.popleft().result()
            oldest = self._writes[0] if len(self._writes) >= QUEUED_PACKS else None
            self._writes.append(self._writer.submit(self._write_pack, pack))
        if oldest is not None:
            oldest.result()

    def _write_pack(self, pack: Pack) -> None:
        self._write_atomically(pack_relpath(pack.id), pack.pieces(), sync_directory=False)
        with self._lock:
            self._written[pack.id] = [(digest, where.offset, where.length) for digest, where in pack.blobs.items()]
        self.index().add(pack.blobs)
        self._buffer.written(pack)

    def _finish_packs(self) -> dict[str, list[Blob]]:
        """Write the pack being filled and make every pack written so far durable; return them for an index."""
        last = self._buffer.seal()
        if last is not None:
            self._queue_write(last)
        self._drain_writes()
        with self._lock:
            written, self._written = self._written, {}
        if written:
            self._sync_directory("packs")
        return written

    def _drain_writes(self) -> None:
        """Wait for every queued pack write and let the writer thread go; raise the first write's error."""
        with self._lock:
            writes, self._writes = list(self._writes), deque()
            writer, self._writer = self._writer, None
        try:
            for write in writes:
                write.result()
        finally:
            if writer is not None:
                writer.shutdown()

    def flush(self) -> None:
        """Make every chunk put so far durable and findable: its pack on disk, then an index naming it."""
        written = self._finish_packs()
        if written:
            self._write_atomically(index_relpath(new_id()), [encode_index(written)])

    def get_chunk(self, digest: str) -> bytes:
        blob = self._buffer.pending(digest)
        if blob is None:
            blob = self._read_packed(digest)
        if blob is None and self._has_loose_chunks():
            blob = self._read(chunk_relpath(digest))
        if blob is None and self._index is not None:
            # A garbage collection may have moved the chunk to another pack since the index was read.
            self._index = None
            blob = self._read_packed(digest)
        if blob is None:
            raise ChunkMissing(f"chunk {digest} is not in the store at {self.location}", digest=digest)
        return blob

    def _read_packed(self, digest: str) -> bytes | None:
        where = self.index().get(digest)
        return None if where is None else self._read_range(where.relpath, where.offset, where.length)

    def list_chunks(self) -> list[str]:
        """Digests of every chunk in the store, as its files say now."""
        return sorted(set(self._load_index().locations) | set(self._loose_digests()))

    def delete_chunk(self, digest: str) -> None:
        """Forget the chunk: its loose file goes, and the index files that name it are rewritten without it
        (its bytes stay in their pack until garbage collection rewrites the pack)."""
        self._remove(chunk_relpath(digest))
        for index_id in self._index_ids():
            data = self._read(index_relpath(index_id))
            packs = decode_index(data) if data is not None else {}
            kept = {pack: [blob for blob in blobs if blob[0] != digest] for pack, blobs in packs.items()}
            if kept != packs:
                self._write_atomically(index_relpath(index_id), [encode_index(kept)])
        self._index = None

    def collect(self, referenced: set[str], on_progress: Progress = ignore_progress) -> dict[str, int]:
        """Delete every chunk not in `referenced`; return counts. `on_progress(done, total)` follows the
        bytes of live chunks rewritten into new packs.

        A pack whose chunks are all unreferenced is deleted; one with more than REPACK_DEAD_SHARE of
        its bytes unreferenced has its referenced chunks written into new packs and is deleted then.
        One new index replaces all index files. The caller makes sure no backup is writing to the
        store meanwhile: that is also what makes a pack no index names (a crashed backup's) garbage.
        Every step leaves the store whole: new packs and their index are durable before an old
        index or pack goes; a restore reading meanwhile finds moved chunks by re-reading the index."""
        index = self._index = self._load_index()
        loose = set(self._loose_digests())
        present = set(index.locations) | loose
        for digest in loose - referenced:
            self._remove(chunk_relpath(digest))
        self._remove_empty_loose_directories()
        pack_sizes = self._pack_sizes()
        keep: dict[str, list[Blob]] = {}
        moving = []
        for pack, blobs in index.by_pack(referenced).items():
            live = sum(where.length for _, where in blobs)
            if live >= (1 - REPACK_DEAD_SHARE) * pack_sizes[pack]:
                keep[pack] = [(digest, where.offset, where.length) for digest, where in blobs]
            else:
                moving += blobs
        total, done = sum(where.length for _, where in moving), 0
        for digest, where in moving:
            blob = self._read_range(where.relpath, where.offset, where.length)
            if blob is not None:
                self._pack(digest, blob)
            done += where.length
            on_progress(done, total)
        written = self._finish_packs()
        old_indexes = self._index_ids()
        if keep or written:
            self._write_atomically(index_relpath(new_id()), [encode_index(keep | written)])
        for index_id in old_indexes:
            self._remove(index_relpath(index_id))
        for pack in pack_sizes.keys() - keep.keys() - written.keys():
            self._remove(pack_relpath(pack))
        self._remove_temporaries()
        self._index = None
        return {"chunks_deleted": len(present - referenced), "chunks_kept": len(present & referenced),
                "packs_deleted": len(pack_sizes.keys() - keep.keys()), "packs_written": len(written)}

    def _remove_empty_loose_directories(self) -> None:
        """Once the last chunks from before packs are gone, so are their directories: a store without
        them is not searched for loose copies any more."""
        for prefix in self._listdir("chunks"):
            if not self._listdir(f"chunks/{prefix}"):
                self._remove_directory(f"chunks/{prefix}")
        if not self._listdir("chunks"):
            self._remove_directory("chunks")
        self._loose = None

    def _remove_temporaries(self) -> None:
        """Remove what writes cut short by a crash left behind in packs/ and index/."""
        for directory in ("packs", "index"):
            for name in self._listdir(directory):
                if name.endswith(TEMP_SUFFIX):
                    self._remove(f"{directory}/{name}")

    # -- manifests --------------------------------------------------------------------------

    def has_manifest(self, backup_id: str) -> bool:
        return self._size(manifest_relpath(backup_id)) is not None

    def put_manifest(self, backup_id: str, manifest: dict[str, Any]) -> None:
        """Publish a manifest, after every chunk put so far is durable; from this moment the backup is visible."""
        self.flush()
        self._write_atomically(manifest_relpath(backup_id), [encode_manifest(manifest)])

    def get_manifest(self, backup_id: str) -> dict[str, Any]:
        data = self._read(manifest_relpath(backup_id))
        if data is None:
            raise ManifestNotFound(f"backup {backup_id} has no manifest in the store at {self.location}",
                                   backup_id=backup_id)
        return json.loads(data)

    def delete_manifest(self, backup_id: str) -> None:
        self._remove(manifest_relpath(backup_id))

    def list_manifests(self) -> list[str]:
        """Ids of every published backup."""
        names = self._listdir("manifests")
        return sorted(name[: -len(".json")] for name in names if name.endswith(".json"))

    def close(self) -> None:
        """Let go of the writer thread (waiting for its writes) and of connections; a store is also a
        context manager that closes itself."""
        self._drain_writes()

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        try:
            self.close()
        except Exception:
            if exc is None:
                raise
            # The block's own error (a cancel, a read error, a pack write raised there) says why it stopped;
            # a pack write that also failed meanwhile must not take its place.
            log.warning("store at %s closed after %s; a pack write failed too", self.location, exc_type.__name__,
                        exc_info=True)


def fsync_directory(path: str) -> None:
    """Make the entries of directory `path` durable: a rename or a new file is on disk only once its directory is."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories(path: str) -> None:
    """`os.makedirs(path)`, syncing the parent of every directory it makes so the new entry survives a crash."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    make_directories(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    fsync_directory(parent)


class LocalStore(ChunkStore):
    """A store in a directory on this host (made if missing); packs of about `pack_target` bytes."""

    def __init__(self, path: str, *, pack_target: int = PACK_TARGET) -> None:
        super().__init__(pack_target)
        self.path = self.location = os.path.abspath(path)
        for sub in STORE_DIRECTORIES:
            make_directories(os.path.join(self.path, sub))

    def _abs(self, relpath: str) -> str:
        return os.path.join(self.path, relpath)

    def _size(self, relpath: str) -> int | None:
        try:
            return os.stat(self._abs(relpath)).st_size
        except FileNotFoundError:
            return None

    def _sizes(self, relpath: str) -> dict[str, int]:
        try:
            with os.scandir(self._abs(relpath)) as entries:
                return {entry.name: entry.stat().st_size for entry in entries if entry.is_file()}
        except FileNotFoundError:
            return {}

    def _read(self, relpath: str) -> bytes | None:
        try:
            with open(self._abs(relpath), "rb") as source:
                return source.read()
        except FileNotFoundError:
            return None

    def _read_range(self, relpath: str, offset: int, length: int) -> bytes | None:
        try:
            fd = os.open(self._abs(relpath), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def _write_atomically(self, relpath: str, parts: Sequence[bytes], *, sync_directory: bool = True) -> None:
        final = self._abs(relpath)
        directory = os.path.dirname(final)
        make_directories(directory)
        temp = temp_name(final)
        try:
            with open(temp, "xb") as out:
                out.writelines(parts)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, final)
            if sync_directory:
                fsync_directory(directory)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)

    def _sync_directory(self, relpath: str) -> None:
        fsync_directory(self._abs(relpath))

    def _remove(self, relpath: str) -> None:
        try:
            os.unlink(self._abs(relpath))
        except FileNotFoundError:
            pass

    def _remove_directory(self, relpath: str) -> None:
        try:
            os.rmdir(self._abs(relpath))
        except FileNotFoundError:
            pass

    def _listdir(self, relpath: str) -> list[str]:
        try:
            return os.listdir(self._abs(relpath))
        except FileNotFoundError:
            return []
