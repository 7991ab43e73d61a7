"""Safe shrink on real ext4 images: whole disk and last partition (GPT, MBR); every file checked after."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from errors import DataWouldNotFit, InvalidSize, UnknownFilesystem
from tests.fixtures.san import loop_mounted
from tests.support import need_binary, need_root
from workers.san.reflink import ReflinkBackend
from workers.san.shrink import safe_shrink

MiB = 1 << 20
GPT_TAIL = 33 * 512  # a default GPT keeps 32 sectors of backup entries and a backup header at the end
pytestmark = pytest.mark.integration


@pytest.fixture
def backend(tmp_path: Path) -> ReflinkBackend:
    need_root()
    need_binary("mkfs.ext4", "e2fsck", "resize2fs", "dumpe2fs", "sfdisk", "blkid", "losetup")
    pool = tmp_path / "pool"
    pool.mkdir()
    return ReflinkBackend(str(pool))


def write_files(root: Path, count: int, max_size: int) -> dict[str, str]:
    """Files of random sizes and content (some in a subdirectory); their sha256 by relative path."""
    sums = {}
    (root / "sub").mkdir()
    for i in range(count):
        rel = f"sub/f{i}" if i % 3 else f"f{i}"
        data = os.urandom(int.from_bytes(os.urandom(3), "big") % max_size + 1)
        (root / rel).write_bytes(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def read_sums(root: Path, names: dict[str, str]) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in names}


def fsck_clean(image: Path, offset: int, length: int) -> bool:
    device = subprocess.run(["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(length),
                             str(image)], check=True, capture_output=True, text=True).stdout.strip()
    try:
        return subprocess.run(["e2fsck", "-f", "-n", device], capture_output=True).returncode == 0
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def make_partitioned(path: Path, label: str) -> tuple[int, int]:
    """Two partitions (16 MiB, then the rest) with ext4 on the last; return its (offset, length)."""
    subprocess.run(["sfdisk", "--quiet", str(path)], input=f"label: {label}\n,16M\n,\n".encode(), check=True)
    dump = subprocess.run(["sfdisk", "--json", str(path)], check=True, capture_output=True, text=True).stdout
    last = json.loads(dump)["partitiontable"]["partitions"][-1]
    offset, length = last["start"] * 512, last["size"] * 512
    device = subprocess.run(["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(length),
                             str(path)], check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mkfs.ext4", "-q", device], check=True)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)
    return offset, length


def test_shrink_whole_disk_ext4_keeps_every_file(backend: ReflinkBackend, tmp_path: Path) -> None:
    vol = backend.create("data-1", 128 * MiB)
    image = Path(backend.path_for_export(vol))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    with loop_mounted(image, tmp_path / "mnt") as root:
        sums = write_files(root, 30, MiB // 2)

    result = safe_shrink(backend, vol, 48 * MiB)

    assert backend.size(vol) == 48 * MiB == result.filesystem_bytes
    assert result.minimum_bytes < 48 * MiB
    assert fsck_clean(image, 0, 48 * MiB)
    with loop_mounted(image, tmp_path / "mnt", readonly=True) as root:
        assert read_sums(root, sums) == sums


@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_shrink_last_partition_keeps_every_file_and_a_valid_table(backend: ReflinkBackend, tmp_path: Path,
                                                                  label: str) -> None:
    vol = backend.create(f"disk-{label}", 160 * MiB)
    image = Path(backend.path_for_export(vol))
    offset, length = make_partitioned(image, label)
    with loop_mounted(image, tmp_path / "mnt", offset=offset, length=length) as root:
        sums = write_files(root, 30, MiB // 2)

    result = safe_shrink(backend, vol, 96 * MiB)

    assert backend.size(vol) == 96 * MiB
    tail = GPT_TAIL if label == "gpt" else 0
    assert result.layout.tail == tail
    new_length = result.filesystem_bytes
    assert offset + new_length <= 96 * MiB - tail
    assert 96 * MiB - tail - offset - new_length < 4096, "the partition uses the room it has"
    verify = subprocess.run(["sfdisk", "--verify", str(image)], capture_output=True, text=True)
    assert verify.returncode == 0 and "mismatch" not in verify.stderr, verify.stdout + verify.stderr
    assert fsck_clean(image, offset, new_length)
    with loop_mounted(image, tmp_path / "mnt", offset=offset, length=new_length, readonly=True) as root:
        assert read_sums(root, sums) == sums


def test_refuses_when_data_would_not_fit_and_changes_nothing(backend: ReflinkBackend, tmp_path: Path) -> None:
    vol = backend.create("full-1", 128 * MiB)
    image = Path(backend.path_for_export(vol))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    with loop_mounted(image, tmp_path / "mnt") as root:
        (root / "big").write_bytes(os.urandom(40 * MiB))
    before = hashlib.sha256(image.read_bytes()).hexdigest()

    with pytest.raises(DataWouldNotFit) as refused:
        safe_shrink(backend, vol, 24 * MiB)

    assert 40 * MiB < refused.value.extra["minimum_bytes"] < 128 * MiB
    assert backend.size(vol) == 128 * MiB
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    minimum = refused.value.extra["minimum_bytes"]
    assert safe_shrink(backend, vol, minimum).filesystem_bytes == minimum, "the stated minimum is enough"
    assert fsck_clean(image, 0, minimum)


@pytest.mark.parametrize("content", ["random", "btrfs", "gpt-without-ext"])
def test_refuses_content_it_does_not_understand(backend: ReflinkBackend, content: str) -> None:
    vol = backend.create(f"odd-{content}", 128 * MiB)
    image = Path(backend.path_for_export(vol))
    if content == "random":
        with open(image, "r+b") as f:
            f.write(os.urandom(4 * MiB))
    elif content == "btrfs":
        need_binary("mkfs.btrfs")
        subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True)
    else:
        subprocess.run(["sfdisk", "--quiet", str(image)], input=b"label: gpt\n,16M\n,\n", check=True)
    before = hashlib.sha256(image.read_bytes()).hexdigest()

    with pytest.raises(UnknownFilesystem):
        safe_shrink(backend, vol, 64 * MiB)
    assert backend.size(vol) == 128 * MiB
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_a_larger_size_is_not_a_shrink(backend: ReflinkBackend) -> None:
    vol = backend.create("grow-1", 16 * MiB)
    with pytest.raises(InvalidSize):
        safe_shrink(backend, vol, 32 * MiB)
