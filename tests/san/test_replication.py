"""DR replication's bulk data: two reflink pools on a real XFS, the receiver as a real process
(`python -m workers.san.receive`, and once behind a real sshd), faults made on the real stream."""

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from errors import (
    InvalidName,
    InvalidSize,
    PeerUnreachable,
    ReplicaBaseMissing,
    ReplicationBroken,
    ReplicationCancelled,
)
from tests.fixtures.sshd import SshServer, run_sshd
from tests.support import sha256_of, write_at
from workers.san.backend import snapshot_handle
from workers.san.peer import ProcessChannel, local_peer, open_peer
from workers.san.reflink import ReflinkBackend
from workers.san.replication import (
    BATCH,
    Channel,
    DiskDelta,
    ShipResult,
    encode_frame,
    points_of,
    ranges_to_ship,
    read_frame,
    receive,
    send,
)

MiB = 1024 * 1024
VOLUME = 64 * MiB
BLOCK = 4096
# One 4 KiB write at each, none adjacent: a ship sends these blocks and nothing around them.
SCATTERED = [3 * MiB + 8192, 9 * MiB, 17 * MiB + 4096, 33 * MiB + 60 * 1024, 50 * MiB]


@pytest.fixture
def pools(xfs_dir: Path) -> tuple[ReflinkBackend, ReflinkBackend]:
    """The primary SAN's pool and the DR SAN's pool, both on the XFS."""
    for name in ("source", "replica"):
        (xfs_dir / name).mkdir()
    return ReflinkBackend(str(xfs_dir / "source")), ReflinkBackend(str(xfs_dir / "replica"))


def receiver_argv(replica: ReflinkBackend) -> list[str]:
    return [sys.executable, "-m", "workers.san.receive", "--backend", "reflink", "--pool", replica.pool_dir]


def make_disk(source: ReflinkBackend, name: str) -> None:
    """Random data, compressible text, explicit zeros and holes."""
    source.create(name, VOLUME)
    path = source.path_for_export(name)
    write_at(path, 0, os.urandom(2 * MiB))
    write_at(path, 20 * MiB, b"replicated line\n" * (MiB // 16))
    write_at(path, 40 * MiB, bytes(MiB))
    write_at(path, VOLUME - MiB, os.urandom(MiB))


def scatter(source: ReflinkBackend, name: str, offsets: list[int]) -> None:
    for offset in offsets:
        write_at(source.path_for_export(name), offset, os.urandom(BLOCK))


def delta(source: ReflinkBackend, disk: str, base: str | None, point: str) -> DiskDelta:
    handle = snapshot_handle(disk, point)
    base_handle = snapshot_handle(disk, base) if base else None
    return DiskDelta(replica=disk, base=base, source=handle, size=source.size(handle),
                     ranges=ranges_to_ship(source, base_handle, handle))


def ship(source: ReflinkBackend, replica: ReflinkBackend, disks: list[str], base: str | None, point: str,
         keep: tuple[str, ...] | list[str] = (), channel: Channel | None = None, **options) -> ShipResult:
    deltas = [delta(source, disk, base, point) for disk in disks]
    return send(source, deltas, point, list(keep), channel or local_peer(receiver_argv(replica)), **options)


def same(source: ReflinkBackend, replica: ReflinkBackend, disk: str, point: str) -> bool:
    handle = snapshot_handle(disk, point)
    return sha256_of(source.path_for_export(handle)) == sha256_of(replica.path_for_export(handle))


def first_point(source: ReflinkBackend, replica: ReflinkBackend, disk: str = "vm-1-disk") -> None:
    make_disk(source, disk)
    source.snapshot(disk, "rep-1")
    ship(source, replica, [disk], None, "rep-1")


def test_full_then_delta_reproduce_the_source_and_ship_only_changes(pools) -> None:
    source, replica = pools
    make_disk(source, "vm-1-disk")
    source.snapshot("vm-1-disk", "rep-1")

    full = ship(source, replica, ["vm-1-disk"], None, "rep-1")

    assert full.points == ["rep-1"] and same(source, replica, "vm-1-disk", "rep-1")
    assert not replica.exists("vm-1-disk"), "only snapshots stay on the DR SAN between ships"
    assert os.stat(replica.path_for_export("vm-1-disk@rep-1")).st_blocks * 512 < VOLUME // 4, "holes stay holes"

    scatter(source, "vm-1-disk", SCATTERED)
    source.snapshot("vm-1-disk", "rep-2")
    result = ship(source, replica, ["vm-1-disk"], "rep-1", "rep-2", keep=["rep-1"])

    assert result.points == ["rep-1", "rep-2"]
    assert same(source, replica, "vm-1-disk", "rep-2") and same(source, replica, "vm-1-disk", "rep-1")
    assert result.bytes_changed == len(SCATTERED) * BLOCK
    assert result.bytes_changed < VOLUME // 50 and result.bytes_sent < VOLUME // 50


def test_every_disk_of_a_ship_gets_the_point(pools) -> None:
    source, replica = pools
    for disk in ("vm-1-disk", "vm-1-data"):
        make_disk(source, disk)
        source.snapshot(disk, "rep-1")

    result = ship(source, replica, ["vm-1-disk", "vm-1-data"], None, "rep-1")

    assert result.points == ["rep-1"]
    assert same(source, replica, "vm-1-disk", "rep-1") and same(source, replica, "vm-1-data", "rep-1")


def test_a_grown_disk_ships_its_new_size(pools) -> None:
    source, replica = pools
    first_point(source, replica)
    source.resize("vm-1-disk", VOLUME + 8 * MiB)
    write_at(source.path_for_export("vm-1-disk"), VOLUME + MiB, os.urandom(BLOCK))
    source.snapshot("vm-1-disk", "rep-2")

    ship(source, replica, ["vm-1-disk"], "rep-1", "rep-2")

    assert replica.size("vm-1-disk@rep-2") == VOLUME + 8 * MiB and same(source, replica, "vm-1-disk", "rep-2")


class FlippingChannel:
    """Passes every frame on, but flips one byte in the middle of the first data frame's payload."""

    def __init__(self, inner: Channel) -> None:
        self.inner, self.flipped = inner, False
        self.read, self.close = inner.read, inner.close

    def write(self, frame: bytes) -> None:
        header, payload = read_frame(io.BytesIO(frame).read)
        if not self.flipped and header["type"] == "data":
            at = len(frame) - len(payload) // 2
            frame, self.flipped = frame[:at] + bytes([frame[at] ^ 0xFF]) + frame[at + 1:], True
        self.inner.write(frame)


def change_much(source: ReflinkBackend) -> None:
    write_at(source.path_for_export("vm-1-disk"), 4 * MiB, os.urandom(12 * MiB))


# A few small batches reach the receiver before it refuses: its answer is read after the commit. Many
# big ones fill the pipe: the sender's next write fails, and the answer is read then.
@pytest.mark.parametrize("change", [lambda source: scatter(source, "vm-1-disk", SCATTERED), change_much],
                         ids=["answered-at-commit", "answered-at-broken-pipe"])
def test_a_corrupted_batch_is_refused_and_makes_no_point(pools, change) -> None:
    source, replica = pools
    assert_corruption_refused(source, replica, change, lambda: local_peer(receiver_argv(replica)))


def assert_corruption_refused(source: ReflinkBackend, replica: ReflinkBackend,
                              change: Callable[[ReflinkBackend], None], peer: Callable[[], Channel]) -> None:
    first_point(source, replica)
    before = sha256_of(replica.path_for_export("vm-1-disk@rep-1"))
    change(source)
    source.snapshot("vm-1-disk", "rep-2")

    channel = FlippingChannel(peer())
    with pytest.raises(ReplicationBroken, match="peer refused.*(checksum|decompress)"):
        ship(source, replica, ["vm-1-disk"], "rep-1", "rep-2", channel=channel)

    assert channel.flipped and points_of(replica, "vm-1-disk") == {"rep-1"}
    assert sha256_of(replica.path_for_export("vm-1-disk@rep-1")) == before


class KillingChannel:
    """The receiver process is killed once `frames` writes went through: a ship cut midway."""

    def __init__(self, inner: ProcessChannel, frames: int) -> None:
        self.inner, self.frames = inner, frames
        self.read, self.close = inner.read, inner.close

    def write(self, data: bytes) -> None:
        self.frames -= 1
        if self.frames < 0 and self.inner.process.poll() is None:
            self.inner.process.kill()
            self.inner.process.wait()
        self.inner.write(data)


def test_a_ship_cut_midway_makes_no_point_and_the_next_one_succeeds(pools) -> None:
    source, replica = pools
    first_point(source, replica)
    change_much(source)
    source.snapshot("vm-1-disk", "rep-2")

    with pytest.raises(ReplicationBroken, match="went away|without an answer"):
        ship(source, replica, ["vm-1-disk"], "rep-1", "rep-2",
             channel=KillingChannel(local_peer(receiver_argv(replica)), frames=3))
    assert points_of(replica, "vm-1-disk") == {"rep-1"}

    assert ship(source, replica, ["vm-1-disk"], "rep-1", "rep-2").points == ["rep-2"]
    assert same(source, replica, "vm-1-disk", "rep-2")


def test_a_cancelled_ship_stops_before_its_commit(pools) -> None:
    source, replica = pools
    first_point(source, replica)
    change_much(source)
    source.snapshot("vm-1-disk", "rep-2")
    seen: list[tuple[int, int]] = []

    with pytest.raises(ReplicationCancelled):
        ship(source, replica, ["vm-1-disk"], "rep-1", "rep-2", progress=lambda done, total: seen.append((done, total)),
             cancelled=lambda: len(seen) >= 2)

    assert len(seen) == 2 and seen[-1][0] < seen[-1][1]
    assert points_of(replica, "vm-1-disk") == {"rep-1"}
    assert ship(source, replica, ["vm-1-disk"], "rep-1", "rep-2").points == ["rep-2"]


def test_a_base_the_replica_lacks_asks_for_a_full_ship(pools) -> None:
    source, replica = pools
    make_disk(source, "vm-1-disk")
    source.snapshot("vm-1-disk", "rep-1")
    source.snapshot("vm-1-disk", "rep-2")

    with pytest.raises(ReplicaBaseMissing):
        ship(source, replica, ["vm-1-disk"], "rep-1", "rep-2")

    assert replica.listing() == {}


def test_keep_prunes_the_older_points(pools) -> None:
    source, replica = pools
    first_point(source, replica)
    for base, point in (("rep-1", "rep-2"), ("rep-2", "rep-3")):
        scatter(source, "vm-1-disk", SCATTERED[:2])
        source.snapshot("vm-1-disk", point)
        result = ship(source, replica, ["vm-1-disk"], base, point, keep=[base])

    assert result.points == ["rep-2", "rep-3"] and points_of(replica, "vm-1-disk") == {"rep-2", "rep-3"}
    assert same(source, replica, "vm-1-disk", "rep-3")


def test_a_bandwidth_limit_paces_the_ship(pools) -> None:
    source, replica = pools
    source.create("vm-2-disk", 16 * MiB)
    write_at(source.path_for_export("vm-2-disk"), 0, os.urandom(6 * MiB))
    source.snapshot("vm-2-disk", "rep-1")
    limit = 4 * MiB

    started = time.monotonic()
    result = ship(source, replica, ["vm-2-disk"], None, "rep-1", limit_bytes_s=limit)
    rate = result.bytes_sent / (time.monotonic() - started)

    assert result.bytes_sent > 6 * MiB and rate <= 1.2 * limit
    assert same(source, replica, "vm-2-disk", "rep-1")


# -- the receiver trusts nothing on its stdin --------------------------------------------------------

def begin(replica: str = "vm-1-disk", size: int = VOLUME) -> bytes:
    return encode_frame({"type": "begin", "point": "rep-1", "keep": [],
                         "disks": [{"replica": replica, "base": None, "size": size}]})


def zero(disk: int = 0, offset: int = 0, length: int = BLOCK) -> bytes:
    return encode_frame({"type": "zero", "disk": disk, "offset": offset, "length": length})


def answers(stream: bytes) -> list[dict]:
    reader, found = io.BytesIO(stream), []
    while frame := read_frame(reader.read):
        found.append(frame[0])
    return found


@pytest.mark.parametrize("frames, refused", [
    (begin("../x"), InvalidName),
    (begin(size=1000), InvalidSize),
    (begin() + zero(offset=VOLUME - BLOCK + 512), ReplicationBroken),
    (begin() + zero(disk=1), ReplicationBroken),
    (begin() + zero(length=BATCH + BLOCK), ReplicationBroken),
    (begin() + zero(offset=-BLOCK), ReplicationBroken),
    (begin() + encode_frame({"type": "data", "disk": 0, "offset": 0, "length": BLOCK, "sha256": "0" * 64,
                             "zlen": 3}) + b"abc", ReplicationBroken),
    (begin() + zero(), ReplicationBroken),  # the stream ends before its commit
], ids=["path-in-name", "size-not-sectors", "past-the-end", "no-such-disk", "batch-too-long", "negative-offset",
        "not-zstd", "no-commit"])
def test_the_receiver_refuses_what_it_cannot_trust(pools, frames: bytes, refused: type[Exception]) -> None:
    _, replica = pools
    out = io.BytesIO()

    with pytest.raises(refused):
        receive(replica, io.BytesIO(frames), out)

    assert answers(out.getvalue())[-1]["type"] == "error"
    assert not any("@" in handle for handle in replica.listing())
    assert sorted(os.listdir(Path(replica.pool_dir).parent)) == ["replica", "source"]


def test_the_receiver_process_answers_its_refusal_and_exits_1(pools) -> None:
    _, replica = pools
    channel = local_peer(receiver_argv(replica))
    channel.write(begin("../x"))

    refusal = read_frame(channel.read)[0]
    assert refusal["type"] == "error" and refusal["code"] == "InvalidName" and "../x" in refusal["message"]
    with pytest.raises(ReplicationBroken, match="exited 1"):
        channel.close()


# -- over SSH ------------------------------------------------------------------------------------------

@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    with run_sshd(tmp_path / "sshd") as server:
        yield server


def client_files(tmp_path: Path, server: SshServer, host_key_line: str) -> tuple[Path, Path]:
    key, known_hosts = tmp_path / "id_ed25519", tmp_path / "known_hosts"
    key.write_text(server.private_key)
    known_hosts.write_text(host_key_line + "\n")
    return key, known_hosts


def test_a_ship_over_ssh(pools, sshd: SshServer, tmp_path: Path) -> None:
    source, replica = pools
    make_disk(source, "vm-1-disk")
    source.snapshot("vm-1-disk", "rep-1")
    key, known_hosts = client_files(tmp_path, sshd, sshd.host_key_line)

    channel = open_peer("127.0.0.1", sshd.port, "root", key, known_hosts, receiver_argv(replica))
    result = ship(source, replica, ["vm-1-disk"], None, "rep-1", channel=channel)

    assert result.points == ["rep-1"] and same(source, replica, "vm-1-disk", "rep-1")


def test_a_refusal_over_ssh_reaches_the_sender(pools, sshd: SshServer, tmp_path: Path) -> None:
    source, replica = pools
    key, known_hosts = client_files(tmp_path, sshd, sshd.host_key_line)

    assert_corruption_refused(source, replica, change_much, lambda: open_peer(
        "127.0.0.1", sshd.port, "root", key, known_hosts, receiver_argv(replica)))


def test_a_peer_with_another_host_key_is_unreachable(pools, sshd: SshServer, tmp_path: Path) -> None:
    _, replica = pools
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    key_type, key_b64 = Path(f"{other}.pub").read_text().split()[:2]
    key, known_hosts = client_files(tmp_path, sshd, f"[127.0.0.1]:{sshd.port} {key_type} {key_b64}")

    with pytest.raises(PeerUnreachable, match="127.0.0.1"):
        open_peer("127.0.0.1", sshd.port, "root", key, known_hosts, receiver_argv(replica))
