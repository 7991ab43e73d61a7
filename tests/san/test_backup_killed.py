"""A backup and a garbage collection killed -9 in the middle of writing their packs: the store stays
whole, the next backup and collection finish, and nothing is left behind.

Each runs in a child process that stops at a chosen point (a hook that blocks there), so the
kill lands with packs on disk and the index or old packs not yet written or removed; the test
kills it by PID and always reaps it."""

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lab.processes import wait_until
from tests.support import REPO, sha256_of
from workers.san.backup import backup_volume, collect_garbage, restore_volume, verify_backup
from workers.san.chunks import LocalStore

CHUNK = 256 * 1024
CHUNKS = 64


@contextmanager
def child(script: str) -> Iterator[subprocess.Popen]:
    """A Python child running `script` in the repository; killed -9 and reaped however the test ends."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def kill_when(proc: subprocess.Popen, marker: Path) -> None:
    """Wait until the child has written `marker` (it is then blocked at its stop point), then kill it -9."""
    wait_until(lambda: marker.exists() or proc.poll() is not None, 60, f"the child to reach {marker.name}")
    assert proc.poll() is None, f"the child ended ({proc.returncode}) before its stop point"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_a_backup_killed_while_writing_packs_leaves_a_store_the_next_backup_and_gc_finish(tmp_path: Path) -> None:
    source, root, marker = tmp_path / "volume.img", tmp_path / "store", tmp_path / "stopped"
    source.write_bytes(os.urandom(CHUNK * CHUNKS))
    with child(f"""
        import pathlib, signal
        from workers.san.backup import backup_volume
        from workers.san.chunks import LocalStore
        packs, marker = pathlib.Path("{root}/packs"), pathlib.Path("{marker}")
        def stop_here() -> bool:
            if len(list(packs.glob("*.pack"))) >= 4:
                marker.touch()
                signal.pause()  # blocked here until the test kills it
            return False
        backup_volume("{source}", {CHUNK * CHUNKS}, LocalStore("{root}", pack_target={4 * CHUNK}),
                      backup_id="killed", chunk_size={CHUNK}, should_stop=stop_here)
        """) as proc:
        kill_when(proc, marker)

    store = LocalStore(str(root))
    assert store.list_manifests() == [] and store.list_chunks() == []  # packs on disk, but no index names them
    orphans = set((root / "packs").glob("*.pack"))
    assert len(orphans) >= 4

    manifest = backup_volume(str(source), CHUNK * CHUNKS, store, backup_id="again", chunk_size=CHUNK)
    assert manifest["chunks_written"] == CHUNKS
    result = collect_garbage(LocalStore(str(root)), [manifest])

    assert result["packs_deleted"] == len(orphans) and not orphans & set((root / "packs").iterdir())
    assert verify_backup(LocalStore(str(root)), manifest) == []
    restored = tmp_path / "restored.img"
    restore_volume(LocalStore(str(root)), manifest, str(restored))
    assert sha256_of(restored) == sha256_of(source)
    assert not list(root.rglob("*.tmp"))


def test_a_gc_killed_between_writing_new_packs_and_removing_old_ones_loses_nothing(tmp_path: Path) -> None:
    old, kept_source, root, marker = tmp_path / "old.img", tmp_path / "kept.img", tmp_path / "store", tmp_path / "stopped"
    old.write_bytes(os.urandom(CHUNK * 8))
    kept_source.write_bytes(old.read_bytes()[:CHUNK * 2])
    store = LocalStore(str(root))
    backup_volume(str(old), CHUNK * 8, store, backup_id="old", chunk_size=CHUNK)
    kept = backup_volume(str(kept_source), CHUNK * 2, store, backup_id="kept", chunk_size=CHUNK)
    store.delete_manifest("old")
    with child(f"""
        import pathlib, signal
        from workers.san.backup import collect_garbage
        from workers.san.chunks import LocalStore
        marker = pathlib.Path("{marker}")
        class StopsBeforeRemoving(LocalStore):
            def _remove(self, relpath: str) -> None:
                marker.touch()
                signal.pause()  # blocked here until the test kills it
        store = StopsBeforeRemoving("{root}")
        collect_garbage(store, [store.get_manifest("kept")])
        """) as proc:
        kill_when(proc, marker)

    assert len(list((root / "index").glob("*.json"))) == 2  # the old index and the new one, both whole
    assert verify_backup(LocalStore(str(root)), kept) == []
    result = collect_garbage(LocalStore(str(root)), [kept])
    assert (result["chunks_kept"], result["chunks_deleted"]) == (2, 6)
    assert len(list((root / "packs").iterdir())) == 1 and len(list((root / "index").iterdir())) == 1
    restored = tmp_path / "restored.img"
    restore_volume(LocalStore(str(root)), kept, str(restored))
    assert sha256_of(restored) == sha256_of(kept_source)
