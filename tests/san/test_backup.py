"""Backups into a chunk store, with real files and the real reflink backend on a loop-mounted XFS."""

import hashlib
import itertools
import os
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from errors import BackupCancelled, BackupMismatch, ChunkCorrupt, ChunkMissing
from lab.processes import wait_until
from tests.support import damage_chunk, need_binary, sha256_of, write_at
from workers.command import output
from workers.san import backup
from workers.san.backend import align_and_merge
from workers.san.backup import (
    DIGEST,
    MAX_PIECES,
    ChunkPlan,
    ChunkWriter,
    FullReader,
    Tally,
    advised_ahead,
    backup_volume,
    check_chunks_stored,
    chunk_digest,
    collect_garbage,
    cut_around,
    intersect,
    plan_full,
    restore_volume,
    retention_keep,
    untouched,
    verify_backup,
)
from workers.san.chunks import LocalStore, chunk_relpath
from workers.san.reflink import ReflinkBackend

MiB = 1024 * 1024
CHUNK = 256 * 1024
VOLUME = 64 * MiB


def fill_realistic(path: str | Path) -> None:
    """Random data, compressible text, an explicit zero region and holes (never written)."""
    write_at(path, 0, os.urandom(3 * MiB))
    write_at(path, 8 * MiB, b"laxcluster backup line\n" * (4 * MiB // 23))
    write_at(path, 16 * MiB, bytes(2 * MiB))
    write_at(path, 30 * MiB + 4096, os.urandom(MiB))


@pytest.fixture
def backend(xfs_dir: Path) -> ReflinkBackend:
    return ReflinkBackend(str(xfs_dir))


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(str(tmp_path / "store"))


def snapshot_and_backup(backend: ReflinkBackend, store: LocalStore, snap: str, parent: dict | None = None,
                        parent_snap: str | None = None) -> tuple[str, dict]:
    handle = backend.snapshot("vol", snap)
    ranges = backend.changed_ranges(parent_snap, handle) if parent_snap else None
    manifest = backup_volume(backend.path_for_export(handle), backend.size(handle), store, backup_id=snap,
                             parent_manifest=parent, ranges=ranges, chunk_size=CHUNK, snapshot=handle)
    return handle, manifest


def volume_with_full_backup(backend: ReflinkBackend, store: LocalStore) -> tuple[str, str, dict]:
    """A filled volume `vol` and its full backup `s1`: (volume path, snapshot handle, manifest)."""
    backend.create("vol", VOLUME)
    volume = backend.path_for_export("vol")
    fill_realistic(volume)
    return (volume, *snapshot_and_backup(backend, store, "s1"))


def test_full_and_differential_chain_restore_bit_exact(backend: ReflinkBackend, store: LocalStore,
                                                       tmp_path: Path) -> None:
    volume, s1, full = volume_with_full_backup(backend, store)

    changes = [(5 * MiB, os.urandom(MiB)), (20 * MiB, os.urandom(256 * 1024)), (40 * MiB + 8192, os.urandom(4096))]
    for offset, data in changes:
        write_at(volume, offset, data)
    s2, diff1 = snapshot_and_backup(backend, store, "s2", full, s1)
    write_at(volume, 50 * MiB, os.urandom(512 * 1024))
    s3, diff2 = snapshot_and_backup(backend, store, "s3", diff1, s2)

    changed = sum(len(data) for _, data in changes)
    assert diff1["mode"] == "diff" and diff1["parent"] == "s1" and diff2["parent"] == "s2"
    assert 0 < diff1["bytes_read"] <= 2 * changed
    assert diff1["bytes_read"] < full["bytes_read"] / 4
    for handle, manifest in ((s1, full), (s2, diff1), (s3, diff2)):
        restored = tmp_path / f"restored-{manifest['id']}.img"
        restore_volume(store, store.get_manifest(manifest["id"]), str(restored))
        assert sha256_of(restored) == sha256_of(backend.path_for_export(handle)), manifest["id"]


def test_a_differential_after_scattered_4k_writes_reads_what_they_wrote(backend: ReflinkBackend, store: LocalStore,
                                                                        tmp_path: Path) -> None:
    volume, s1, full = volume_with_full_backup(backend, store)
    # 200 distinct 4 KiB blocks anywhere: in data, in written zeros, in holes.
    offsets = [4096 * block for block in random.Random(3).sample(range(VOLUME // 4096), 200)]
    for offset in offsets:
        write_at(volume, offset, os.urandom(4096))
    s2, diff = snapshot_and_backup(backend, store, "s2", full, s1)

    assert diff["bytes_read"] == len(offsets) * 4096
    restored = tmp_path / "restored.img"
    restore_volume(store, diff, str(restored))
    assert sha256_of(restored) == sha256_of(backend.path_for_export(s2))


def test_intersect_cuts_sorted_spans_at_both_ends() -> None:
    spans = [(0, 10), (20, 10), (40, 10), (60, 10)]
    assert intersect(spans, 25, 45) == [(25, 5), (40, 5)]
    assert intersect(spans, 10, 20) == []
    assert intersect(spans, 30, 40) == []
    assert intersect(spans, 0, 70) == spans
    assert intersect(spans, 65, 100) == [(65, 5)]
    assert intersect([], 0, 10) == []


def test_zero_chunks_are_not_stored_and_holes_not_read(backend: ReflinkBackend, store: LocalStore,
                                                       tmp_path: Path) -> None:
    backend.create("vol", VOLUME)
    fill_realistic(backend.path_for_export("vol"))
    _, full = snapshot_and_backup(backend, store, "s1")

    written = 3 * MiB + 4 * MiB + 2 * MiB + MiB
    assert written <= full["bytes_read"] <= written + 2 * CHUNK  # partial chunks at the edges
    zero_entries = [entry for entry in full["chunks"] if entry.get("zero")]
    assert len(zero_entries) >= (VOLUME - written) // CHUNK - 2
    assert any(entry["offset"] == 16 * MiB for entry in zero_entries)  # written zeros, not a hole
    stored = set(store.list_chunks())
    assert stored == {entry["digest"] for entry in full["chunks"] if "digest" in entry}
    # Compressible text dedups to a handful of chunks and compresses well.
    assert full["bytes_stored"] < full["data_bytes"]
    restored = tmp_path / "restored.img"
    restore_volume(store, full, str(restored))
    assert os.stat(restored).st_blocks * 512 < VOLUME / 2  # zero chunks stayed holes


def test_a_full_reads_whole_data_chunks_direct_and_the_rest_through_the_cache(xfs_dir: Path, store: LocalStore,
                                                                            tmp_path: Path) -> None:
    volume = xfs_dir / "odd.img"
    size = 4 * CHUNK + 1000
    with open(volume, "wb") as out:
        out.truncate(size)
    write_at(volume, 0, os.urandom(2 * CHUNK))  # two whole chunks: one direct read
    write_at(volume, 2 * CHUNK + CHUNK // 2, os.urandom(CHUNK // 2))  # a chunk that starts with a hole
    write_at(volume, 4 * CHUNK, os.urandom(1000))  # an unaligned end
    content = volume.read_bytes()

    with open(volume, "rb") as source:
        plans = plan_full(source.fileno(), size, CHUNK)
        reader = FullReader(str(volume), source.fileno(), plans, buffers=1)
        try:
            assert reader.direct is not None, "XFS takes O_DIRECT"
            spare = reader.free.qsize()
            chunks = reader.chunks()
            reads = [next(chunks)]
            assert reader.free.qsize() == spare - 2, "the next whole chunk came in the same read"
            reads += list(chunks)
            assert [plan for plan, _, _ in reads] == plans
            assert [type(data) is memoryview for _, data, _ in reads] == [True, True, False, False, False]
            assert reader.free.qsize() == spare - 2
            for plan, data, release in reads:
                assert bytes(data) == content[plan.offset:plan.offset + plan.length]
                release()
            assert reader.free.qsize() == spare
        finally:
            reader.close()

    full = backup_volume(str(volume), size, store, backup_id="odd", chunk_size=CHUNK)
    restored = tmp_path / "restored.img"
    restore_volume(store, full, str(restored))
    assert restored.read_bytes() == content


def test_differential_follows_a_grown_volume(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 3 + 4096))
    full = backup_volume(str(source), source.stat().st_size, store, backup_id="f", chunk_size=CHUNK)
    with open(source, "ab") as grow:
        grow.write(os.urandom(CHUNK))
    diff = backup_volume(str(source), source.stat().st_size, store, backup_id="d", parent_manifest=full,
                         ranges=[], chunk_size=CHUNK)

    assert diff["bytes_read"] == CHUNK  # only the new bytes; the rest of their chunk comes from the parent
    restored = tmp_path / "restored.img"
    restore_volume(store, diff, str(restored))
    assert sha256_of(restored) == sha256_of(source)

    os.truncate(source, CHUNK * 2 + 512)
    shrunk = backup_volume(str(source), CHUNK * 2 + 512, store, backup_id="s", parent_manifest=diff, ranges=[],
                           chunk_size=CHUNK)
    assert shrunk["bytes_read"] == 0 and len(shrunk["chunks"]) == 3
    restore_volume(store, shrunk, str(restored))
    assert sha256_of(restored) == sha256_of(source)


def test_cutting_around_changes_keeps_exactly_what_no_change_covers() -> None:
    rng = random.Random(5)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, 4000), rng.randint(0, 30)))
        bounds = [0, *cuts, 4000]
        entries = [{"offset": lo, "length": hi - lo, "digest": f"{lo:064x}", "stored": 1}
                   for lo, hi in itertools.pairwise(bounds)]
        changed = align_and_merge([(start, rng.randint(1, 300)) for start in rng.sample(range(4000), rng.randint(0, 12))],
                                  1, 4000)
        cut = cut_around(entries, changed)
        covered = {byte for offset, length in changed for byte in range(offset, offset + length)}
        kept = [byte for entry in cut for byte in range(entry["offset"], entry["offset"] + entry["length"])]
        assert kept == sorted(set(range(4000)) - covered)
        assert cut == [piece for entry in entries for piece in untouched(entry, changed)]


def resident_bytes(path: Path) -> int:
    """Bytes of the file in the page cache, as fincore (util-linux-extra) counts them."""
    return int(output(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)]))


def test_a_differential_asks_the_kernel_for_its_ranges_a_window_ahead(tmp_path: Path) -> None:
    need_binary("fincore")
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(8 * MiB))
    piece = 64 * 1024
    plans = [ChunkPlan(cell * MiB, piece, [(cell * MiB, piece)]) for cell in range(8)]
    with open(source, "rb") as volume:
        os.fsync(volume.fileno())
        os.posix_fadvise(volume.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert resident_bytes(source) == 0
        handed = advised_ahead(volume.fileno(), plans, 3 * piece)
        first = next(handed)
        wait_until(lambda: resident_bytes(source) >= 3 * piece, 10, "the advised window in the page cache",
                   interval=0.01)
        assert resident_bytes(source) == 3 * piece  # the window, nothing read past it
        assert [first, *handed] == plans


def test_a_differential_reads_only_the_changed_ranges_of_a_chunk(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 4))
    full = backup_volume(str(source), CHUNK * 4, store, backup_id="f", chunk_size=CHUNK)
    write_at(source, CHUNK + 4096, os.urandom(4096))
    write_at(source, CHUNK * 3, bytes(8192))
    changed = [(CHUNK + 4096, 4096), (CHUNK * 3, 8192)]
    diff = backup_volume(str(source), CHUNK * 4, store, backup_id="d", parent_manifest=full, ranges=changed,
                         chunk_size=CHUNK)

    assert diff["bytes_read"] == 4096 + 8192
    assert diff["chunks_written"] == 1 and diff["bytes_written"] < 4096 + 100  # the 4 KiB alone; zeros are not stored
    second, fourth = full["chunks"][1], full["chunks"][3]
    assert diff["chunks"] == [
        full["chunks"][0],
        {**second, "length": 4096, "at": 0, "size": CHUNK},
        {"offset": CHUNK + 4096, "length": 4096, "digest": chunk_digest(source.read_bytes()[CHUNK + 4096:CHUNK + 8192], DIGEST),
         "stored": diff["bytes_written"]},
        {**second, "offset": CHUNK + 8192, "length": CHUNK - 8192, "at": 8192, "size": CHUNK},
        full["chunks"][2],
        {"offset": CHUNK * 3, "length": 8192, "zero": True},
        {**fourth, "offset": CHUNK * 3 + 8192, "length": CHUNK - 8192, "at": 8192, "size": CHUNK},
    ]
    fetched = []

    class CountingStore(LocalStore):
        def get_chunk(self, digest: str) -> bytes:
            fetched.append(digest)
            return super().get_chunk(digest)

    restored = tmp_path / "restored.img"
    restore_volume(CountingStore(store.path), diff, str(restored))
    assert sha256_of(restored) == sha256_of(source)
    assert sorted(fetched) == sorted({e["digest"] for e in diff["chunks"] if "digest" in e})  # each chunk once


def test_a_chain_of_differentials_over_one_another_restores_each_bit_exact(store: LocalStore,
                                                                         tmp_path: Path) -> None:
    """Changes of any size and alignment land on slices of slices, on zeros and across the grid; the
    volume grows and shrinks on the way. Every backup of the chain restores and verifies."""
    rng = random.Random(5)
    source = tmp_path / "volume.img"
    source.write_bytes(rng.randbytes(CHUNK * 5 + 1000))
    parent = backup_volume(str(source), source.stat().st_size, store, backup_id="b0", chunk_size=CHUNK)
    chain = [(parent, source.read_bytes())]
    for number in range(1, 9):
        size = source.stat().st_size
        if number == 4:
            os.truncate(source, size - CHUNK - 777)
        elif number == 6:
            os.truncate(source, size + CHUNK + 333)
        size = source.stat().st_size
        starts = [rng.randrange(size - 20) for _ in range(12)]
        ranges = [(start, min(rng.choice((1, 512, 4096, 70_000, CHUNK + 3)), size - start)) for start in starts]
        for offset, length in ranges:
            write_at(source, offset, bytes(length) if rng.random() < 0.2 else rng.randbytes(length))
        parent = backup_volume(str(source), size, store, backup_id=f"b{number}", parent_manifest=parent,
                               ranges=ranges, chunk_size=CHUNK)
        chain.append((parent, source.read_bytes()))

    reopened = LocalStore(store.path)
    for manifest, content in chain:
        restored = tmp_path / f"restored-{manifest['id']}.img"
        restore_volume(reopened, reopened.get_manifest(manifest["id"]), str(restored))
        assert restored.read_bytes() == content, manifest["id"]
        assert verify_backup(reopened, manifest) == []
    assert any("at" in entry for manifest, _ in chain for entry in manifest["chunks"])


def test_a_cell_changed_in_too_many_places_is_read_whole_into_one_chunk(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 2))
    full = backup_volume(str(source), CHUNK * 2, store, backup_id="f", chunk_size=CHUNK)
    few = [(CHUNK + 16384 * n + 8192, 4096) for n in range(MAX_PIECES // 2 - 1)]  # 2 * writes + 1 entries in the cell
    for offset, length in few:
        write_at(source, offset, os.urandom(length))
    diff = backup_volume(str(source), CHUNK * 2, store, backup_id="d", parent_manifest=full, ranges=few,
                         chunk_size=CHUNK)
    assert diff["bytes_read"] == 4096 * len(few) and len(diff["chunks"]) == 1 + 2 * len(few) + 1

    many = [(CHUNK + 16384 * n, 4096) for n in range(2)]
    for offset, length in many:
        write_at(source, offset, os.urandom(length))
    again = backup_volume(str(source), CHUNK * 2, store, backup_id="a", parent_manifest=diff, ranges=many,
                          chunk_size=CHUNK)

    assert again["bytes_read"] == CHUNK  # the crowded cell, read whole
    assert again["chunks"][0] == full["chunks"][0] and len(again["chunks"]) == 2
    assert "at" not in again["chunks"][1] and again["chunks"][1]["length"] == CHUNK
    restored = tmp_path / "restored.img"
    restore_volume(store, again, str(restored))
    assert sha256_of(restored) == sha256_of(source)


def test_verify_names_a_corrupted_and_a_missing_chunk(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 6))
    manifest = backup_volume(str(source), CHUNK * 6, store, backup_id="f", chunk_size=CHUNK)
    assert verify_backup(store, manifest) == []

    corrupt, missing = manifest["chunks"][2]["digest"], manifest["chunks"][4]["digest"]
    damage_chunk(store.path, store, corrupt, 20, b"garbage")
    store.delete_chunk(missing)
    problems = verify_backup(LocalStore(store.path), manifest)

    assert len(problems) == 2
    assert any(corrupt in p and f"offset {2 * CHUNK}" in p and "ChunkCorrupt" in p for p in problems)
    assert any(missing in p and f"offset {4 * CHUNK}" in p and "ChunkMissing" in p for p in problems)
    with pytest.raises(ChunkCorrupt):
        restore_volume(store, {**manifest, "chunks": manifest["chunks"][:4]}, str(tmp_path / "out.img"))


def test_a_full_backup_writes_one_pack_and_one_index_beside_its_manifest(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 16))
    manifest = backup_volume(str(source), CHUNK * 16, store, backup_id="f", chunk_size=CHUNK)

    files = sorted(str(p.relative_to(store.path)).split("/")[0] for p in Path(store.path).rglob("*") if p.is_file())
    assert files == ["index", "manifests", "packs"]
    assert len({store.locate(e["digest"])[0] for e in manifest["chunks"]}) == 1
    assert manifest["chunks_written"] == 16


def test_a_second_full_of_the_same_bytes_compresses_and_writes_nothing(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 4) + b"text that compresses\n" * (CHUNK * 4 // 21))
    first = backup_volume(str(source), source.stat().st_size, store, backup_id="first", chunk_size=CHUNK)
    second = backup_volume(str(source), source.stat().st_size, LocalStore(store.path), backup_id="second",
                           chunk_size=CHUNK)

    assert first["chunks_compressed"] == first["chunks_written"] == len({e["digest"] for e in first["chunks"]}) > 4
    assert (second["chunks_compressed"], second["chunks_written"]) == (0, 0)
    assert second["chunks"] == first["chunks"]
    check_chunks_stored(LocalStore(store.path), second)


def store_whose_pack_writes_fail(path: Path) -> LocalStore:
    """A store whose packs/ is a plain file: every pack write fails with the filesystem's own error."""
    store = LocalStore(str(path), pack_target=CHUNK)
    store.index()  # read while packs/ is a directory
    (path / "packs").rmdir()
    (path / "packs").write_bytes(b"")
    return store


def test_a_failed_pack_write_fails_the_store_s_block(tmp_path: Path) -> None:
    blob = os.urandom(CHUNK)
    with pytest.raises(OSError):
        with store_whose_pack_writes_fail(tmp_path / "store") as store:
            store.put_chunk(hashlib.sha256(blob).hexdigest(), blob)


def test_a_pack_write_failing_meanwhile_does_not_replace_the_block_s_own_error(tmp_path: Path) -> None:
    blob = os.urandom(CHUNK)
    with pytest.raises(BackupCancelled, match="cancelled by the test"):
        with store_whose_pack_writes_fail(tmp_path / "store") as store:
            store.put_chunk(hashlib.sha256(blob).hexdigest(), blob)
            raise BackupCancelled("cancelled by the test")


def cut_pack_inside(store: LocalStore, digest: str) -> set[str]:
    """Truncate the pack holding `digest` in the middle of it, as a crash of a store that did not sync
    can leave it; return the digests the cut loses (that one and all after it in the pack)."""
    relpath, offset, length = store.locate(digest)
    pack = Path(store.path) / relpath
    os.truncate(pack, offset + length // 2)
    return {d for d, where in store.index().locations.items() if where.relpath == relpath
            and where.offset + where.length > offset + length // 2}


def test_a_restore_can_look_for_missing_chunks_before_it_writes(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 3))
    manifest = backup_volume(str(source), CHUNK * 3, store, backup_id="f", chunk_size=CHUNK)
    check_chunks_stored(store, manifest)

    lost = cut_pack_inside(store, manifest["chunks"][1]["digest"])
    first_lost = next(e for e in manifest["chunks"] if e["digest"] in lost)
    with pytest.raises(ChunkMissing, match=first_lost["digest"]):
        check_chunks_stored(LocalStore(store.path), manifest)


def test_chunks_a_cut_pack_lost_are_written_again_by_the_next_backup(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 4))
    first = backup_volume(str(source), CHUNK * 4, store, backup_id="first", chunk_size=CHUNK)
    lost = cut_pack_inside(store, first["chunks"][1]["digest"])

    reopened = LocalStore(store.path)  # as the next job opens it
    second = backup_volume(str(source), CHUNK * 4, reopened, backup_id="second", chunk_size=CHUNK)

    assert second["chunks_written"] == len(lost) >= 1
    assert [e["digest"] for e in second["chunks"]] == [e["digest"] for e in first["chunks"]]
    assert verify_backup(reopened, second) == [] and verify_backup(reopened, first) == []
    restored = tmp_path / "restored.img"
    restore_volume(LocalStore(store.path), first, str(restored))
    assert sha256_of(restored) == sha256_of(source)


def test_verify_finds_an_incomplete_manifest(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 3))
    manifest = backup_volume(str(source), CHUNK * 3, store, backup_id="f", chunk_size=CHUNK)
    gap = {**manifest, "chunks": [manifest["chunks"][0], manifest["chunks"][2]]}
    short = {**manifest, "chunks": manifest["chunks"][:2]}
    assert verify_backup(store, gap) == [f"chunk 1: starts at {2 * CHUNK}, expected {CHUNK}"]
    assert verify_backup(store, short) == [f"chunks cover {2 * CHUNK} bytes of a {3 * CHUNK}-byte volume"]


def test_cancel_leaves_no_manifest(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 8))
    progress: list[int] = []

    with pytest.raises(BackupCancelled):
        backup_volume(str(source), CHUNK * 8, store, backup_id="f", chunk_size=CHUNK,
                      on_progress=lambda done, total: progress.append(done), should_stop=lambda: len(progress) >= 3)

    assert store.list_manifests() == []
    assert not store.has_manifest("f")
    assert 3 <= len(progress) < 8
    assert not [p for p in Path(store.path).rglob("*.tmp")]


LEGACY_CHUNK = 4 * MiB


def write_legacy_full(store: LocalStore, source: Path, backup_id: str) -> dict:
    """A full backup of `source` as stores held them before packs: one zstd file per 4 MiB chunk at
    chunks/<first 2 hex digits>/<sha256>.zst beside the same format-1 manifest, laid out here as
    that version of LocalStore wrote them."""
    data, entries = source.read_bytes(), []
    for offset in range(0, len(data), LEGACY_CHUNK):
        piece = data[offset:offset + LEGACY_CHUNK]
        entry = {"offset": offset, "length": len(piece)}
        if piece == bytes(len(piece)):
            entries.append({**entry, "zero": True})
            continue
        digest, blob = hashlib.sha256(piece).hexdigest(), ChunkWriter(store, Tally(), "sha256").compress(bytearray(piece))
        path = Path(store.path) / chunk_relpath(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        entries.append({**entry, "digest": digest, "stored": len(blob)})
    manifest = {"format": 1, "id": backup_id, "digest": "sha256", "compression": "zstd", "volume_size": len(data),
                "chunk_size": LEGACY_CHUNK, "chunks": entries, "parent": None, "mode": "full", "snapshot": None}
    store.put_manifest(backup_id, manifest)
    return manifest


def legacy_volume(tmp_path: Path) -> Path:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(LEGACY_CHUNK) + bytes(LEGACY_CHUNK) + b"an old line\n" * (LEGACY_CHUNK // 12)
                       + b"\n" * (LEGACY_CHUNK % 12))
    return source


def test_a_backup_made_before_packs_restores_verifies_and_parents_a_differential(
        store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The differential is made as the versions between packs and BLAKE3 made them (SHA-256 names): such
    manifests mix chunk files and packs, and must restore and verify as they are."""
    monkeypatch.setattr(backup, "DIGEST", "sha256")
    source = legacy_volume(tmp_path)
    old = write_legacy_full(store, source, "old")
    store = LocalStore(store.path)
    assert verify_backup(store, old) == []
    restored = tmp_path / "restored.img"
    restore_volume(store, old, str(restored))
    assert sha256_of(restored) == sha256_of(source)

    write_at(source, 2 * LEGACY_CHUNK + 4096, os.urandom(64 * 1024))
    diff = backup_volume(str(source), source.stat().st_size, store, backup_id="diff", parent_manifest=old,
                         ranges=[(2 * LEGACY_CHUNK + 4096, 64 * 1024)])

    assert (diff["chunk_size"], diff["bytes_read"], diff["chunks_written"]) == (LEGACY_CHUNK, 64 * 1024, 1)
    fresh = next(e for e in diff["chunks"] if e["offset"] == 2 * LEGACY_CHUNK + 4096)
    assert store.locate(fresh["digest"])[0].startswith("packs/")
    assert store.locate(diff["chunks"][0]["digest"])[0] == chunk_relpath(old["chunks"][0]["digest"])
    around = [e.get("at") for e in diff["chunks"] if e.get("digest") == old["chunks"][2]["digest"]]
    assert around == [0, 4096 + 64 * 1024]  # the old chunk is referenced on both sides of the change
    restore_volume(LocalStore(store.path), diff, str(restored))
    assert sha256_of(restored) == sha256_of(source)

    damage_chunk(store.path, store, old["chunks"][0]["digest"], 10, b"bitrot")
    assert [p for p in verify_backup(store, diff) if "ChunkCorrupt" in p and "offset 0" in p]
    store.delete_manifest("old")
    write_at(source, 2 * LEGACY_CHUNK, os.urandom(LEGACY_CHUNK))
    newer = backup_volume(str(source), source.stat().st_size, store, backup_id="newer", parent_manifest=diff,
                          ranges=[(2 * LEGACY_CHUNK, LEGACY_CHUNK)])
    assert collect_garbage(store, [diff, newer])["chunks_deleted"] == 0  # slices keep their chunk
    store.delete_manifest("diff")
    result = collect_garbage(store, [newer])
    assert (result["chunks_deleted"], result["chunks_kept"]) == (2, 2)
    assert not (Path(store.path) / chunk_relpath(old["chunks"][2]["digest"])).exists()


def test_gc_of_the_last_chunks_from_before_packs_removes_their_directories(store: LocalStore, tmp_path: Path) -> None:
    source = legacy_volume(tmp_path)
    write_legacy_full(store, source, "old")
    kept = backup_volume(str(source), source.stat().st_size, LocalStore(store.path), backup_id="new",
                         chunk_size=CHUNK)
    store.delete_manifest("old")

    result = collect_garbage(LocalStore(store.path), [kept])

    assert result["chunks_deleted"] == 2
    assert not (Path(store.path) / "chunks").exists()
    assert not LocalStore(store.path)._has_loose_chunks()  # new chunks no longer look for a loose copy
    assert verify_backup(LocalStore(store.path), kept) == []


def test_a_torn_chunk_from_before_packs_is_found_and_written_again(store: LocalStore, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """By a full made as before BLAKE3: one made now names its chunks otherwise and leaves the old one torn."""
    monkeypatch.setattr(backup, "DIGEST", "sha256")
    source = legacy_volume(tmp_path)
    old = write_legacy_full(store, source, "old")
    torn = Path(store.path) / chunk_relpath(old["chunks"][2]["digest"])
    torn.write_bytes(torn.read_bytes()[:100])  # what a store that did not sync could leave after a crash
    with pytest.raises(ChunkCorrupt, match=f"offset {2 * LEGACY_CHUNK}"):
        check_chunks_stored(LocalStore(store.path), old)

    again = backup_volume(str(source), source.stat().st_size, LocalStore(store.path), backup_id="again",
                          chunk_size=LEGACY_CHUNK)

    assert again["chunks_written"] == 1
    check_chunks_stored(LocalStore(store.path), old)
    restored = tmp_path / "restored.img"
    restore_volume(LocalStore(store.path), old, str(restored))
    assert sha256_of(restored) == sha256_of(source)


def test_gc_removes_exactly_the_unreferenced_chunks(store: LocalStore, tmp_path: Path) -> None:
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    shared = os.urandom(CHUNK)
    first.write_bytes(shared + os.urandom(CHUNK * 2))
    second.write_bytes(shared + os.urandom(CHUNK))
    old = backup_volume(str(first), CHUNK * 3, store, backup_id="old", chunk_size=CHUNK)
    kept = backup_volume(str(second), CHUNK * 2, store, backup_id="kept", chunk_size=CHUNK)
    only_old = {e["digest"] for e in old["chunks"]} - {e["digest"] for e in kept["chunks"]}

    store.delete_manifest("old")
    progress: list[tuple[int, int]] = []
    result = collect_garbage(store, [store.get_manifest(i) for i in store.list_manifests()],
                             on_progress=lambda done, total: progress.append((done, total)))

    # old's pack held the shared chunk and two dead ones: the shared one moved to a new pack.
    assert result == {"chunks_deleted": 2, "chunks_kept": 2, "packs_deleted": 1, "packs_written": 1}
    moved = LocalStore(store.path).stored_size(kept["chunks"][0]["digest"])
    assert progress == [(moved, moved)]
    reopened = LocalStore(store.path)
    assert set(reopened.list_chunks()) == {e["digest"] for e in kept["chunks"]}
    assert not any(reopened.has_chunk(d) for d in only_old)
    assert verify_backup(reopened, kept) == []
    assert len(list((Path(store.path) / "packs").iterdir())) == 2
    assert len(list((Path(store.path) / "index").iterdir())) == 1


def test_gc_leaves_a_mostly_live_pack_as_it_is(store: LocalStore, tmp_path: Path) -> None:
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    first.write_bytes(os.urandom(CHUNK * 4))
    second.write_bytes(first.read_bytes()[: CHUNK * 3])
    old = backup_volume(str(first), CHUNK * 4, store, backup_id="old", chunk_size=CHUNK)
    kept = backup_volume(str(second), CHUNK * 3, store, backup_id="kept", chunk_size=CHUNK)
    pack = Path(store.path) / store.locate(old["chunks"][0]["digest"])[0]
    before = pack.stat().st_size

    store.delete_manifest("old")
    result = collect_garbage(store, [kept])

    assert result == {"chunks_deleted": 1, "chunks_kept": 3, "packs_deleted": 0, "packs_written": 0}
    assert pack.stat().st_size == before  # three quarters live: not worth rewriting
    reopened = LocalStore(store.path)
    assert not reopened.has_chunk(old["chunks"][3]["digest"])
    assert verify_backup(reopened, kept) == []


def test_gc_removes_what_a_crashed_backup_left(store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 32))
    packs = Path(store.path) / "packs"
    # 16 packs of 2 chunks, at most 2 queued: packs are on disk long before the last chunk is read.
    with LocalStore(store.path, pack_target=2 * CHUNK) as small_packs, pytest.raises(BackupCancelled):
        backup_volume(str(source), CHUNK * 32, small_packs, backup_id="f", chunk_size=CHUNK,
                      should_stop=lambda: len(list(packs.glob("*.pack"))) >= 2)
    (packs / "0123.pack.abcd.tmp").write_bytes(b"half a pack")
    assert len(list(packs.iterdir())) >= 3 and not list((Path(store.path) / "index").iterdir())

    result = collect_garbage(store, [])

    assert result["packs_deleted"] >= 2 and result["chunks_deleted"] == 0  # no index named them
    assert list(packs.iterdir()) == []


def test_a_reader_finds_a_chunk_garbage_collection_moved(store: LocalStore, tmp_path: Path) -> None:
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    first.write_bytes(os.urandom(CHUNK * 4))
    second.write_bytes(first.read_bytes()[:CHUNK])
    backup_volume(str(first), CHUNK * 4, store, backup_id="old", chunk_size=CHUNK)
    kept = backup_volume(str(second), CHUNK, store, backup_id="kept", chunk_size=CHUNK)
    reader = LocalStore(store.path)
    old_place = reader.locate(kept["chunks"][0]["digest"])

    assert collect_garbage(LocalStore(store.path), [kept])["packs_written"] == 1

    assert verify_backup(reader, kept) == []  # its index still named the deleted pack
    assert reader.locate(kept["chunks"][0]["digest"]) != old_place


def day(n: int, hour: int = 1) -> datetime:
    return datetime(2026, 11, 2, hour, tzinfo=timezone.utc) + timedelta(days=n)


def test_retention_keeps_the_parents_a_kept_differential_needs() -> None:
    backups = [
        {"id": "full-1", "created_at": day(0), "parent": None},
        {"id": "diff-1", "created_at": day(1), "parent": "full-1"},
        {"id": "diff-2", "created_at": day(2), "parent": "diff-1"},
        {"id": "full-2", "created_at": day(7), "parent": None},
        {"id": "diff-3", "created_at": day(8), "parent": "full-2"},
    ]
    assert retention_keep(backups, keep_last=1) == {"diff-3", "full-2"}
    assert retention_keep(backups, keep_last=3) == {"diff-3", "full-2", "diff-2", "diff-1", "full-1"}
    # Weekly keeps the newest of each ISO week: diff-2 (week of day 0-2) drags its chain along.
    assert retention_keep(backups, weekly=2) == {"diff-3", "full-2", "diff-2", "diff-1", "full-1"}
    assert retention_keep(backups, weekly=1) == {"diff-3", "full-2"}


def test_retention_daily_keeps_the_newest_of_each_day() -> None:
    backups = [{"id": f"b{n}-{h}", "created_at": day(n, h), "parent": None} for n in range(5) for h in (1, 13)]
    assert retention_keep(backups, daily=3) == {"b4-13", "b3-13", "b2-13"}
    assert retention_keep(backups, keep_last=1, monthly=1) == {"b4-13"}
    assert len(retention_keep(backups)) == len(backups)


def test_a_differential_asked_of_a_sha256_parent_is_made_as_a_full_named_by_blake3(store: LocalStore,
                                                                                   tmp_path: Path) -> None:
    source = legacy_volume(tmp_path)
    old = write_legacy_full(store, source, "old")
    write_at(source, 2 * LEGACY_CHUNK + 4096, os.urandom(64 * 1024))

    new = backup_volume(str(source), source.stat().st_size, store, backup_id="new", parent_manifest=old,
                        ranges=[(2 * LEGACY_CHUNK + 4096, 64 * 1024)])

    assert (new["mode"], new["parent"], new["digest"], new["chunk_size"]) == ("full", None, "blake3", backup.CHUNK_SIZE)
    assert new["bytes_read"] == source.stat().st_size  # read whole: no range of the old backup is reused
    named = {e["digest"] for e in new["chunks"] if "digest" in e}
    assert named.isdisjoint(e["digest"] for e in old["chunks"] if "digest" in e)
    data = source.read_bytes()
    assert all(e["digest"] == chunk_digest(data[e["offset"]:e["offset"] + e["length"]], "blake3")
               for e in new["chunks"] if "digest" in e)
    restored = tmp_path / "restored.img"
    restore_volume(LocalStore(store.path), new, str(restored))
    assert sha256_of(restored) == sha256_of(source)
    assert verify_backup(store, new) == [] and verify_backup(store, old) == []
    damage_chunk(store.path, store, new["chunks"][0]["digest"], 10, b"bitrot")
    assert [p for p in verify_backup(store, new) if "ChunkCorrupt" in p and "offset 0" in p]


def test_a_backup_naming_an_unknown_digest_is_refused_before_anything_is_read(store: LocalStore,
                                                                              tmp_path: Path) -> None:
    source = legacy_volume(tmp_path)
    manifest = {**write_legacy_full(store, source, "old"), "digest": "md5"}
    restored = tmp_path / "restored.img"
    with pytest.raises(BackupMismatch, match="unknown digest 'md5'"):
        restore_volume(store, manifest, str(restored))
    with pytest.raises(BackupMismatch, match="unknown digest 'md5'"):
        verify_backup(store, manifest)
    assert not restored.exists()
