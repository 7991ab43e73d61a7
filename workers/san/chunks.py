"""Where backups live: a content-addressed chunk store plus one JSON manifest per backup.

A store only keeps blobs; it does not know how they were made. Chunks are named by the
hex digest of their uncompressed bytes and hold those bytes compressed (zstd, by
workers.san.backup). Every write is atomic and durable (a temporary file, synced, renamed
into place, then its directory synced), so a reader never sees half a chunk or half a
manifest, a crash leaves at most a stray temporary file (`*.tmp`) behind, and a chunk a
manifest names is on disk before the manifest is.

Layout of a `LocalStore(path)`:
    chunks/<first 2 hex digits>/<digest>.zst
    manifests/<backup id>.json
"""

import json
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from errors import ChunkMissing, InvalidStoreName, ManifestNotFound

DIGEST_RE = re.compile(r"[0-9a-f]{16,128}")
BACKUP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TEMP_SUFFIX = ".tmp"


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

    `put_*` are idempotent: putting a chunk that is already whole is a no-op (same digest, same bytes).
    `delete_*` of something missing succeeds. `get_*` raise ChunkMissing / ManifestNotFound.

    The interface is written once here over a few file operations on paths relative to the
    store's root, which each kind of store implements (`_size`, `_read`, `_write_atomically`,
    `_remove`, `_listdir`); `location` names the store in errors.
    """

    location: str

    @abstractmethod
    def _size(self, relpath: str) -> int | None:
        """The file's size, or None if it does not exist."""

    @abstractmethod
    def _read(self, relpath: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""

    @abstractmethod
    def _write_atomically(self, relpath: str, data: bytes) -> None:
        """Make the file hold `data`, all at once: a reader sees the old file or the new, never part."""

    @abstractmethod
    def _remove(self, relpath: str) -> None:
        """Delete the file; a missing one is no error."""

    @abstractmethod
    def _listdir(self, relpath: str) -> list[str]:
        """Names in the directory."""

    def stored_size(self, digest: str) -> int | None:
        """The chunk's size in the store (compressed), or None if the store does not have it."""
        return self._size(chunk_relpath(digest))

    def has_chunk(self, digest: str) -> bool:
        return self.stored_size(digest) is not None

    def put_chunk(self, digest: str, blob: bytes) -> bool:
        """Store the chunk unless the store holds it whole; return whether it was written.

        Whole means exactly `len(blob)` bytes: the same bytes compress to the same blob, so a chunk of
        another size is torn (a write cut short on a store that did not sync) and is written again.
        Bit rot of the right size is what verify is for."""
        if self.stored_size(digest) == len(blob):
            return False
        self._write_atomically(chunk_relpath(digest), blob)
        return True

    def get_chunk(self, digest: str) -> bytes:
        blob = self._read(chunk_relpath(digest))
        if blob is None:
            raise ChunkMissing(f"chunk {digest} is not in the store at {self.location}", digest=digest)
        return blob

    def delete_chunk(self, digest: str) -> None:
        self._remove(chunk_relpath(digest))

    def list_chunks(self) -> Iterator[str]:
        """Digests of every chunk in the store."""
        for prefix in sorted(self._listdir("chunks")):
            for name in sorted(self._listdir(f"chunks/{prefix}")):
                if name.endswith(".zst"):
                    yield name[: -len(".zst")]

    def has_manifest(self, backup_id: str) -> bool:
        return self._size(manifest_relpath(backup_id)) is not None

    def put_manifest(self, backup_id: str, manifest: dict[str, Any]) -> None:
        """Publish a manifest; from this moment the backup is visible."""
        self._write_atomically(manifest_relpath(backup_id), encode_manifest(manifest))

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
        """Let go of connections; a store is also a context manager that closes itself."""

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    """A store in a directory on this host (made if missing)."""

    def __init__(self, path: str) -> None:
        self.path = self.location = os.path.abspath(path)
        for sub in ("chunks", "manifests"):
            make_directories(os.path.join(self.path, sub))

    def _abs(self, relpath: str) -> str:
        return os.path.join(self.path, relpath)

    def _size(self, relpath: str) -> int | None:
        try:
            return os.stat(self._abs(relpath)).st_size
        except FileNotFoundError:
            return None

    def _read(self, relpath: str) -> bytes | None:
        try:
            with open(self._abs(relpath), "rb") as source:
                return source.read()
        except FileNotFoundError:
            return None

    def _write_atomically(self, relpath: str, data: bytes) -> None:
        final = self._abs(relpath)
        directory = os.path.dirname(final)
        make_directories(directory)
        temp = temp_name(final)
        try:
            with open(temp, "xb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, final)
            fsync_directory(directory)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)

    def _remove(self, relpath: str) -> None:
        try:
            os.unlink(self._abs(relpath))
        except FileNotFoundError:
            pass

    def _listdir(self, relpath: str) -> list[str]:
        return os.listdir(self._abs(relpath))
