"""DR replication's bulk data: the wire protocol, the sender (primary SAN) and the receiver (DR SAN).

The sender streams, for every disk of a VM, the byte ranges that changed since a base point both
SANs hold (everything, for a first ship) to `workers.san.receive` on the peer, which applies them to
a work copy of each replica and only then, all disks complete and synced, snapshots every copy as
the new point. A ship that breaks anywhere leaves the peer's points as they were.

Every message is a frame: a 4-byte big-endian header length, a JSON header, then `zlen` bytes of
payload when the header has `zlen`. The receiver answers in frames too: `ok`, or `error` with a code.

    begin  {point, keep, disks: [{replica, base, size}]}    -> ok | error
    data   {disk, offset, length, sha256, zlen} + zstd(raw)     (no answer: streamed)
    zero   {disk, offset, length}                                (no answer: streamed)
    commit {}                                                -> ok {points} | error

An error in the middle of the stream is answered at once and the receiver exits; the sender sees it
when its next write fails or when it reads the answer to `commit`. The receiver trusts nothing it
reads: every name is validated, every number checked against the disk it addresses.
"""

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import zstandard

from errors import (
    InvalidName,
    LaxError,
    NoSpace,
    ReplicaBaseMissing,
    ReplicationBroken,
    ReplicationCancelled,
)
from workers.progress import Progress, ignore_progress
from workers.san.backend import Range, VolumeBackend, parse_snapshot, snapshot_handle, validate_name, validate_size
from workers.san.sparse import data_segments

BATCH = 4 * 1024 * 1024
# zstd's worst case for a batch of incompressible bytes is a few hundred bytes over it.
MAX_PAYLOAD = BATCH + 64 * 1024
MAX_HEADER = 1024 * 1024
ZSTD_LEVEL = 3
# A limited ship is written in slices this big, so its rate stays even instead of bursting a batch.
PACE_SLICE = 256 * 1024
PREFIX = struct.Struct(">I")
POINT_RE = re.compile(r"rep-(\d+)")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
FALLOC_FL_KEEP_SIZE = 0x1
FALLOC_FL_PUNCH_HOLE = 0x2
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
# Errors of the receiver the sender raises as they are; any other code arrives as ReplicationBroken.
PEER_ERRORS = {cls.code: cls for cls in (ReplicaBaseMissing, ReplicationBroken, NoSpace, InvalidName)}

CancelCheck = Callable[[], bool]


class Channel(Protocol):
    """A byte stream to a receiver and back. `write` raises OSError once the receiver stopped reading;
    `read(n)` returns n bytes, fewer only at the end of the stream; `close` ends the receiver and
    raises ReplicationBroken if it failed."""

    def write(self, data: bytes) -> None: ...

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DiskDelta:
    """One disk of a ship: read `ranges` of snapshot `source` here, apply them to `replica` on the peer
    over its point `base` (None: a full ship onto an empty volume)."""

    replica: str
    base: str | None
    source: str
    size: int
    ranges: list[Range]


@dataclass(frozen=True)
class ShipResult:
    """A committed ship: `point` is on the peer for every disk; `bytes_changed` raw bytes were shipped as
    `bytes_sent` bytes on the channel in `batches` batches; `points` are the peer's points, oldest first."""

    point: str
    bytes_changed: int
    bytes_sent: int
    batches: int
    points: list[str]


def never_cancelled() -> bool:
    return False


def validate_point(name: str) -> str:
    """Return `name` if it is a replica point's name, `rep-<n>`; raise InvalidName."""
    if not POINT_RE.fullmatch(validate_name(name)):
        raise InvalidName(f"invalid replica point {name!r}: expected rep-<number>", name=name)
    return name


def point_order(name: str) -> int:
    return int(POINT_RE.fullmatch(name).group(1))


# -- frames ------------------------------------------------------------------------------------

def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    return PREFIX.pack(len(body)) + body + payload


def read_frame(read: Callable[[int], bytes]) -> tuple[dict[str, Any], bytes] | None:
    """The next (header, payload); None at the end of the stream between frames. A cut or malformed
    frame raises ReplicationBroken."""
    prefix = read(PREFIX.size)
    if not prefix:
        return None
    (length,) = PREFIX.unpack(exactly(prefix, PREFIX.size))
    if length > MAX_HEADER:
        raise ReplicationBroken(f"frame header of {length} bytes is over the limit of {MAX_HEADER}")
    header = json.loads(exactly(read(length), length))
    if not isinstance(header, dict):
        raise ReplicationBroken("frame header is not a JSON object")
    zlen = whole(header, "zlen", 0, MAX_PAYLOAD) if "zlen" in header else 0
    return header, exactly(read(zlen), zlen) if zlen else b""


def exactly(data: bytes, length: int) -> bytes:
    if len(data) != length:
        raise ReplicationBroken(f"the stream ended inside a frame ({len(data)} of {length} bytes)")
    return data


def whole(header: dict[str, Any], key: str, low: int, high: int) -> int:
    """`header[key]`, which must be an integer in [low, high]."""
    value = header.get(key)
    if type(value) is not int or not low <= value <= high:
        raise ReplicationBroken(f"frame field {key}={value!r} is not a whole number in [{low}, {high}]")
    return value


# -- the sender ----------------------------------------------------------------------------------

def ranges_to_ship(backend: VolumeBackend, base_handle: str | None, source: str) -> list[Range]:
    """What a ship of snapshot `source` sends: what changed since `base_handle`, or, with no base,
    every byte that is not a hole (a block device has no holes to skip: all of it)."""
    if base_handle is not None:
        return backend.changed_ranges(base_handle, source)
    size = backend.size(source)
    with open(backend.path_for_export(source), "rb") as image:
        if stat.S_ISBLK(os.fstat(image.fileno()).st_mode):
            return [(0, size)]
        return list(data_segments(image.fileno(), size))


def send(backend: VolumeBackend, disks: list[DiskDelta], point: str, keep: list[str], channel: Channel, *,
         limit_bytes_s: int | None = None, progress: Progress = ignore_progress,
         cancelled: CancelCheck = never_cancelled) -> ShipResult:
    """Ship `disks` to the receiver at the end of `channel` as replica point `point`, the peer keeping
    only the points in `keep` besides it. The channel is closed whatever happens.

    `limit_bytes_s` (None or 0: no limit) caps what is written per second; `progress(done, total)`
    follows the raw bytes after each batch; `cancelled()` is asked between batches and stops the
    ship (ReplicationCancelled) before its commit. Raises what the receiver refused with
    (ReplicaBaseMissing: start over with a full ship) or ReplicationBroken."""
    begin = begin_header(disks, point, keep)
    wire = Wire(channel, limit_bytes_s)
    try:
        wire.send(begin)
        wire.answer()
        total = sum(length for disk in disks for _, length in disk.ranges)
        batches = stream(backend, disks, wire, total, progress, cancelled)
        wire.send({"type": "commit"})
        points = wire.answer().get("points")
    except BaseException:
        wire.close_quietly()
        raise
    channel.close()
    if not isinstance(points, list) or point not in points:
        raise ReplicationBroken(f"the receiver committed but does not list point {point}: {points!r}")
    return ShipResult(point, total, wire.sent, batches, points)


def begin_header(disks: list[DiskDelta], point: str, keep: list[str]) -> dict[str, Any]:
    return {"type": "begin", "point": validate_point(point), "keep": [validate_point(name) for name in keep],
            "disks": [{"replica": validate_name(disk.replica),
                       "base": None if disk.base is None else validate_name(disk.base),
                       "size": validate_size(disk.size)} for disk in disks]}


def stream(backend: VolumeBackend, disks: list[DiskDelta], wire: "Wire", total: int, progress: Progress,
           cancelled: CancelCheck) -> int:
    """Send every batch of every disk; return how many."""
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    done = batches = 0
    for index, disk in enumerate(disks):
        with open(backend.path_for_export(disk.source), "rb") as source:
            for offset, length in batches_of(disk.ranges):
                if cancelled():
                    raise ReplicationCancelled(f"the ship of {disk.source} was cancelled", disk=disk.replica)
                raw = os.pread(source.fileno(), length, offset)
                if len(raw) != length:
                    raise ReplicationBroken(f"{disk.source} ends before {offset + length}", source=disk.source)
                wire.send(*data_frame(compressor, index, offset, raw))
                done, batches = done + length, batches + 1
                progress(done, total)
    return batches


def batches_of(ranges: list[Range]) -> Iterator[Range]:
    for offset, length in ranges:
        for start in range(offset, offset + length, BATCH):
            yield start, min(BATCH, offset + length - start)


def data_frame(compressor: zstandard.ZstdCompressor, index: int, offset: int,
               raw: bytes) -> tuple[dict[str, Any], bytes]:
    """A batch as a frame: `zero` (no payload) when it is all zeros, else `data` with its checksum."""
    where = {"disk": index, "offset": offset, "length": len(raw)}
    if raw.count(0) == len(raw):
        return {"type": "zero", **where}, b""
    payload = compressor.compress(raw)
    return {"type": "data", **where, "sha256": hashlib.sha256(raw).hexdigest(), "zlen": len(payload)}, payload


class Wire:
    """The sender's end of a channel: frames out, counted and paced; the receiver's answers in."""

    def __init__(self, channel: Channel, limit_bytes_s: int | None) -> None:
        self.channel = channel
        self.limit = limit_bytes_s or None
        self.sent = 0
        self.started = time.monotonic()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        frame = encode_frame(header, payload)
        pieces = [frame[at:at + PACE_SLICE] for at in range(0, len(frame), PACE_SLICE)] if self.limit else [frame]
        try:
            for piece in pieces:
                self.channel.write(piece)
                self.sent += len(piece)
                self._pace()
        except OSError as exc:
            raise self._broken(exc) from None

    def _pace(self) -> None:
        # Throttling, not synchronisation: wait until what was written fits the limit since the start.
        if self.limit:
            ahead = self.started + self.sent / self.limit - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def _broken(self, exc: OSError) -> LaxError:
        """The receiver stopped reading: its error answer says why, if it gave one."""
        try:
            frame = read_frame(self.channel.read)
        except (OSError, ValueError, LaxError):
            frame = None
        if frame is not None and frame[0].get("type") == "error":
            return peer_error(frame[0])
        return ReplicationBroken(f"the receiver went away during the ship: {exc}")

    def answer(self) -> dict[str, Any]:
        """The receiver's `ok` answer; its error raised as one of ours."""
        try:
            frame = read_frame(self.channel.read)
        except (OSError, ValueError) as exc:
            raise ReplicationBroken(f"the receiver's answer could not be read: {exc}") from None
        if frame is None:
            raise ReplicationBroken("the receiver ended without an answer")
        header = frame[0]
        if header.get("type") == "error":
            raise peer_error(header)
        if header.get("type") != "ok":
            raise ReplicationBroken(f"the receiver answered {header.get('type')!r}, not ok")
        return header

    def close_quietly(self) -> None:
        """Close after a failure: the receiver exits non-zero then, which is no news."""
        with contextlib.suppress(OSError, LaxError):
            self.channel.close()


def peer_error(header: dict[str, Any]) -> LaxError:
    code, message = str(header.get("code")), str(header.get("message"))
    return PEER_ERRORS.get(code, ReplicationBroken)(f"the peer refused the ship: {message}", peer_code=code)


# -- the receiver ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReplicaPlan:
    replica: str
    base: str | None
    size: int


@dataclass(frozen=True)
class ShipPlan:
    point: str
    keep: list[str]
    disks: list[ReplicaPlan]


@dataclass(frozen=True)
class WorkFile:
    """A disk's work volume, open for writing while the ship's data arrives."""

    size: int
    fd: int


def receive(backend: VolumeBackend, reader: BinaryIO, writer: BinaryIO) -> None:
    """Apply one ship read from `reader` to `backend`, answering on `writer`. Returns once the point is
    committed; otherwise raises the error it answered with (a cut stream raises ReplicationBroken)."""
    try:
        apply_ship(backend, reader, writer)
    except LaxError as exc:
        refuse(writer, exc)
        raise
    except (OSError, ValueError, zstandard.ZstdError) as exc:
        error = receiver_error(exc)
        refuse(writer, error)
        raise error from exc


def receiver_error(exc: Exception) -> LaxError:
    """What a failure below the protocol (a full disk, a malformed header) is called on the wire."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"the replica SAN is full: {exc}")
    return ReplicationBroken(f"the receiver failed: {exc}")


def apply_ship(backend: VolumeBackend, reader: BinaryIO, writer: BinaryIO) -> None:
    plan = parse_begin(expect(read_frame(reader.read), "begin")[0])
    prepare(backend, plan)
    answer(writer, {"type": "ok"})
    work = [WorkFile(disk.size, os.open(backend.path_for_export(disk.replica), os.O_WRONLY)) for disk in plan.disks]
    try:
        while True:
            header, payload = expect(read_frame(reader.read), "data", "zero", "commit")
            if header["type"] == "commit":
                break
            apply_batch(header, payload, work)
        for file in work:
            os.fsync(file.fd)
    finally:
        for file in work:
            os.close(file.fd)
    answer(writer, {"type": "ok", "points": commit(backend, plan)})


def expect(frame: tuple[dict[str, Any], bytes] | None, *types: str) -> tuple[dict[str, Any], bytes]:
    if frame is None:
        raise ReplicationBroken("the sender ended the stream before its commit")
    if frame[0].get("type") not in types:
        raise ReplicationBroken(f"expected a {' or '.join(types)} frame, got {frame[0].get('type')!r}")
    return frame


def parse_begin(header: dict[str, Any]) -> ShipPlan:
    keep, disks = header.get("keep"), header.get("disks")
    if not isinstance(keep, list) or not isinstance(disks, list) or not disks:
        raise ReplicationBroken("begin needs a list `keep` and a non-empty list `disks`")
    plan = ShipPlan(validate_point(header.get("point")), [validate_point(name) for name in keep],
                    [parse_disk(disk) for disk in disks])
    if len({disk.replica for disk in plan.disks}) != len(plan.disks):
        raise ReplicationBroken("begin names a replica twice")
    return plan


def parse_disk(disk: Any) -> ReplicaPlan:
    if not isinstance(disk, dict):
        raise ReplicationBroken("each disk in begin is an object {replica, base, size}")
    base = disk.get("base")
    return ReplicaPlan(validate_name(disk.get("replica")), None if base is None else validate_name(base),
                       validate_size(disk.get("size")))


def prepare(backend: VolumeBackend, plan: ShipPlan) -> None:
    """Make each disk's work volume, `<replica>`: a copy of its base point at the new size, or an empty
    volume. Any work volume a broken ship left is replaced. Bases are checked before anything changes."""
    missing = [disk.replica for disk in plan.disks
               if disk.base and not backend.exists(snapshot_handle(disk.replica, disk.base))]
    if missing:
        raise ReplicaBaseMissing(f"the replica SAN lacks the base point of {', '.join(missing)}", replicas=missing)
    for disk in plan.disks:
        backend.delete(disk.replica)
        if disk.base is None:
            backend.create(disk.replica, disk.size)
            continue
        backend.clone(snapshot_handle(disk.replica, disk.base), disk.replica)
        current = backend.size(disk.replica)
        if current != disk.size:
            # Shrinking is safe: the ranges shipped reproduce the source up to its (new) size.
            backend.resize(disk.replica, disk.size, contents_fit=disk.size < current)


def apply_batch(header: dict[str, Any], payload: bytes, work: list[WorkFile]) -> None:
    file = work[whole(header, "disk", 0, len(work) - 1)]
    length = whole(header, "length", 1, BATCH)
    offset = whole(header, "offset", 0, file.size - length)
    if header["type"] == "zero":
        zero_range(file.fd, offset, length)
        return
    raw = unpack(header, payload, length)
    if os.pwrite(file.fd, raw, offset) != length:
        raise ReplicationBroken(f"short write at {offset} of disk {header['disk']}")


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make `length` bytes at `offset` read as zeros: punched out, so the replica stays sparse; written
    where the file or device cannot punch."""
    if LIBC.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err != errno.EOPNOTSUPP:
        raise OSError(err, os.strerror(err))
    if os.pwrite(fd, bytes(length), offset) != length:
        raise ReplicationBroken(f"short write of zeros at {offset}")


def unpack(header: dict[str, Any], payload: bytes, length: int) -> bytes:
    """The raw bytes of a data frame, which must be `length` long and hash to its sha256."""
    digest = header.get("sha256")
    if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
        raise ReplicationBroken("a data frame has no valid sha256")
    where = f"disk {header['disk']} at {header['offset']}"
    try:
        # The frame's own content size is checked first: zstd would allocate whatever it claims.
        if zstandard.frame_content_size(payload) != length:
            raise ReplicationBroken(f"the batch for {where} does not declare its {length} bytes")
        raw = zstandard.ZstdDecompressor().decompress(payload)
    except zstandard.ZstdError as exc:
        raise ReplicationBroken(f"the batch for {where} does not decompress: {exc}") from None
    if len(raw) != length or hashlib.sha256(raw).hexdigest() != digest:
        raise ReplicationBroken(f"the batch for {where} does not match its checksum", disk=header["disk"])
    return raw


def commit(backend: VolumeBackend, plan: ShipPlan) -> list[str]:
    """Every disk's data is written and synced: snapshot each work volume as the point, drop the work
    volumes and the points not kept; return the points every disk has, oldest first."""
    for disk in plan.disks:
        # A retried ship of the same point replaces what the earlier try committed.
        backend.delete_snapshot(snapshot_handle(disk.replica, plan.point))
        backend.snapshot(disk.replica, plan.point)
    for disk in plan.disks:
        backend.delete(disk.replica)
    kept = {*plan.keep, plan.point}
    for disk in plan.disks:
        for name in points_of(backend, disk.replica) - kept:
            backend.delete_snapshot(snapshot_handle(disk.replica, name))
    common = set.intersection(*(points_of(backend, disk.replica) for disk in plan.disks))
    return sorted(common, key=point_order)


def points_of(backend: VolumeBackend, replica: str) -> set[str]:
    """Names of the replica points (`rep-<n>` snapshots) of volume `replica`."""
    found = set()
    for handle in backend.listing():
        if "@" in handle:
            volume, snap = parse_snapshot(handle)
            if volume == replica and POINT_RE.fullmatch(snap):
                found.add(snap)
    return found


def answer(writer: BinaryIO, header: dict[str, Any]) -> None:
    writer.write(encode_frame(header))
    writer.flush()


def refuse(writer: BinaryIO, error: LaxError) -> None:
    """Answer with `error`; the sender may be gone already, which changes nothing."""
    with contextlib.suppress(OSError):
        answer(writer, {"type": "error", "code": error.code, "message": error.message})
