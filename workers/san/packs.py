"""Pack files: many compressed chunks written as one file, and the index that says where each one is.

A backup of small chunks would otherwise write (and fsync) one file per chunk: at 256 KiB that is
four thousand files and fsyncs per GiB, which cost more than hashing and compressing them. Chunks
are gathered in memory into a pack of about PACK_TARGET bytes, written whole with one fsync; an
index file lists, per pack, each chunk's digest, offset and length. Pure data handling here; the
store (workers.san.chunks) does the files.
"""

import json
import re
import secrets
import threading
from dataclasses import dataclass, field

from errors import InvalidStoreName

PACK_TARGET = 32 * 1024 * 1024
ID_RE = re.compile(r"[0-9a-f]{32}")

Blob = tuple[str, int, int]  # digest, offset in its pack, length


def new_id() -> str:
    """A fresh pack or index id: 128 random bits, so two writers never pick the same name."""
    return secrets.token_hex(16)


def check_id(value: str) -> str:
    """Return `value` if it is a pack or index id; it becomes part of a path."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise InvalidStoreName(f"invalid pack or index id {value!r}", id=value)
    return value


def pack_relpath(pack_id: str) -> str:
    return f"packs/{check_id(pack_id)}.pack"


def index_relpath(index_id: str) -> str:
    return f"index/{check_id(index_id)}.json"


def encode_index(packs: dict[str, list[Blob]]) -> bytes:
    return json.dumps({"packs": packs}, sort_keys=True, separators=(",", ":")).encode()


def decode_index(data: bytes) -> dict[str, list[Blob]]:
    return {check_id(pack): [tuple(blob) for blob in blobs] for pack, blobs in json.loads(data)["packs"].items()}


@dataclass(frozen=True)
class Location:
    """Where a packed chunk's bytes are."""

    pack: str
    offset: int
    length: int

    @property
    def relpath(self) -> str:
        return pack_relpath(self.pack)


@dataclass
class Pack:
    """A pack being filled or ready to write: its id, and where each of its chunks goes and their bytes."""

    id: str = field(default_factory=new_id)
    blobs: dict[str, Location] = field(default_factory=dict)
    parts: dict[str, bytes] = field(default_factory=dict)
    size: int = 0

    def pieces(self) -> list[bytes]:
        """The pack's bytes: its chunks, to be written back to back in the order they were added."""
        return list(self.parts.values())


class PackBuffer:
    """The pack being filled, shared by a backup's pool threads.

    `add` returns the pack once it reaches the target size (the caller writes it, outside the
    lock, while other threads fill the next); `seal` returns what is left at the end. A returned
    pack's chunks stay readable here until the caller says it is `written`."""

    def __init__(self, target: int = PACK_TARGET) -> None:
        self.target = target
        self.lock = threading.Lock()
        self.pack = Pack()
        self.sealed: dict[str, Pack] = {}

    def add(self, digest: str, blob: bytes) -> Pack | None:
        with self.lock:
            if digest in self.pack.blobs:
                return None
            self.pack.blobs[digest] = Location(self.pack.id, self.pack.size, len(blob))
            self.pack.parts[digest] = blob
            self.pack.size += len(blob)
            return self._seal() if self.pack.size >= self.target else None

    def seal(self) -> Pack | None:
        with self.lock:
            return self._seal() if self.pack.blobs else None

    def _seal(self) -> Pack:
        sealed, self.pack = self.pack, Pack()
        self.sealed[sealed.id] = sealed
        return sealed

    def written(self, pack: Pack) -> None:
        with self.lock:
            self.sealed.pop(pack.id, None)

    def pending(self, digest: str) -> bytes | None:
        """The bytes of a chunk added but not yet written, or None."""
        with self.lock:
            for pack in (self.pack, *self.sealed.values()):
                if digest in pack.parts:
                    return pack.parts[digest]
        return None


class PackIndex:
    """Where each packed chunk is, from every index file, keeping only chunks whose pack is on disk
    and long enough to hold them: a pack cut short or lost leaves its chunks absent, so the next
    backup stores them again."""

    def __init__(self) -> None:
        self.locations: dict[str, Location] = {}
        self.lock = threading.Lock()

    @classmethod
    def from_files(cls, indexes: list[dict[str, list[Blob]]], pack_sizes: dict[str, int]) -> "PackIndex":
        index = cls()
        for packs in indexes:
            for pack, blobs in packs.items():
                size = pack_sizes.get(pack, -1)
                index.add({digest: Location(pack, offset, length) for digest, offset, length in blobs
                           if offset + length <= size})
        return index

    def add(self, blobs: dict[str, Location]) -> None:
        with self.lock:
            self.locations.update(blobs)

    def get(self, digest: str) -> Location | None:
        return self.locations.get(digest)

    def by_pack(self, digests: set[str]) -> dict[str, list[tuple[str, Location]]]:
        """The chunks among `digests` grouped by the pack that holds them."""
        grouped: dict[str, list[tuple[str, Location]]] = {}
        for digest, where in self.locations.items():
            if digest in digests:
                grouped.setdefault(where.pack, []).append((digest, where))
        return grouped
