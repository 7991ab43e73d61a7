"""The SSH store against a real sshd: a backup chain written, restored, verified and collected over SFTP."""

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from errors import ChunkMissing, StoreUnreachable
from tests.fixtures.sshd import SshServer, run_sshd
from tests.support import damage_chunk
from workers.san.backup import backup_volume, collect_garbage, restore_volume, verify_backup
from workers.san.ssh_store import SshStore

CHUNK = 256 * 1024


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    with run_sshd(tmp_path / "sshd") as server:
        yield server


def store_at(sshd: SshServer, path: Path, **changes) -> SshStore:
    credentials = {"private_key": sshd.private_key, "host_key": sshd.host_key_line, "port": str(sshd.port), **changes}
    return SshStore.from_row(f"root@127.0.0.1:{path}", credentials)


def test_a_backup_chain_over_ssh_restores_bit_exact(sshd: SshServer, tmp_path: Path) -> None:
    remote = tmp_path / "remote" / "store"
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 5) + bytes(CHUNK * 3))
    with store_at(sshd, remote) as store:
        full = backup_volume(str(source), CHUNK * 8, store, backup_id="full", chunk_size=CHUNK)
        with open(source, "r+b") as volume:
            volume.seek(CHUNK * 2)
            volume.write(os.urandom(CHUNK))
        diff = backup_volume(str(source), CHUNK * 8, store, backup_id="diff", parent_manifest=full,
                             ranges=[(CHUNK * 2, CHUNK)], chunk_size=CHUNK)
        restored = tmp_path / "restored.img"
        restore_volume(store, store.get_manifest("diff"), str(restored))
        assert diff["bytes_read"] == CHUNK
        assert hashlib.sha256(restored.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
        assert sorted(store.list_manifests()) == ["diff", "full"]
        assert sorted(p.name for p in (remote / "manifests").iterdir()) == ["diff.json", "full.json"]

        bad = diff["chunks"][0]["digest"]
        damage_chunk(remote, store, bad, 0, b"not zstd")
        assert [p for p in verify_backup(store, diff) if bad in p and "ChunkCorrupt" in p]

        store.delete_manifest("full")
        (remote / "chunks" / "ab").mkdir(parents=True)  # emptied by a collection from before packs
        assert collect_garbage(store, [diff])["chunks_deleted"] == 1
        assert not (remote / "chunks").exists()
        with pytest.raises(ChunkMissing):
            store.get_chunk(full["chunks"][2]["digest"])
        assert not list(remote.rglob("*.tmp"))
        problems = verify_backup(store, diff)  # the chunks garbage collection moved are found, the bad one still bad
        assert len(problems) == 1 and bad in problems[0]


def test_a_host_with_another_host_key_is_refused(sshd: SshServer, tmp_path: Path) -> None:
    impostor = f"[127.0.0.1]:{sshd.port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEJQujcdYiCL"
    with pytest.raises(StoreUnreachable):
        store_at(sshd, tmp_path / "store", host_key=impostor)
    assert not (tmp_path / "store").exists()


def test_every_file_is_synced_on_the_server_before_its_rename_and_its_directory_after(tmp_path: Path) -> None:
    remote = tmp_path / "remote" / "store"
    source = tmp_path / "volume.img"
    source.write_bytes(os.urandom(CHUNK * 3))
    with run_sshd(tmp_path / "sshd", sftp_log=True) as server, store_at(server, remote) as store:
        backup_volume(str(source), CHUNK * 3, store, backup_id="full", chunk_size=CHUNK)
        served = server.sftp_log.read_text().splitlines()  # sftp-server logs a request before it answers it

    written = sorted(path for path in remote.rglob("*") if path.is_file())
    assert [path.parent.name for path in written] == ["index", "manifests", "packs"]  # three chunks in one pack
    for final in written:
        rename = next(number for number, line in enumerate(served)
                      if line.startswith("posix-rename old ") and line.endswith(f' new "{final}"'))
        temp = re.match(r'posix-rename old "([^"]+)"', served[rename]).group(1)
        assert f'fsync "{temp}"' in served[:rename], final
        assert f'fsync "{final.parent}"' in served[rename + 1:], final
