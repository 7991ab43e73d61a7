"""The LVM thin backend: its command lines, thin_delta parsing against the real tool, and the
metadata operations that run without device-mapper (pvcreate, vgcreate, linear lvcreate, resize)."""

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from errors import ShrinkRefused, VolumeNotFound
from tests.fixtures.san import detach_all
from tests.support import need_binary, need_root
from workers.san.lvm import (
    LvmThinBackend,
    device_mapper_available,
    dm_name,
    lv_name,
    lvcreate_snapshot_argv,
    lvcreate_thin_argv,
    parse_thin_delta,
    pool_message_argv,
    thin_delta_argv,
)

MiB = 1 << 20
NO_DM = "needs device-mapper (no /dev/mapper/control on this machine)"
HAS_DM = device_mapper_available()


def needs_devicemapper(test):
    """Mark a test that drives live thin volumes: skipped, naming why, where device-mapper is absent."""
    for mark in (pytest.mark.devicemapper, pytest.mark.integration,
                 pytest.mark.skipif(not HAS_DM, reason=NO_DM)):
        test = mark(test)
    return test


THIN_METADATA = """<superblock uuid="" time="1" transaction="1" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">
  <device dev_id="1" mapped_blocks="4" transaction="0" creation_time="0" snap_time="0">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="7" data_block="7" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="5" transaction="0" creation_time="0" snap_time="1">
    <single_mapping origin_block="0" data_block="0" time="0"/>
    <single_mapping origin_block="1" data_block="10" time="1"/>
    <single_mapping origin_block="2" data_block="2" time="0"/>
    <range_mapping origin_begin="5" data_begin="11" length="2" time="1"/>
  </device>
</superblock>
"""


def sparse_file(path: Path, size: int) -> None:
    path.write_bytes(b"")
    os.truncate(path, size)


def test_command_lines() -> None:
    assert lvcreate_thin_argv("san", "pool", "web-1", 20 * MiB) == [
        "lvcreate", "--yes", "--type", "thin", "--virtualsize", "20971520b", "--thinpool", "san/pool", "--name", "web-1"]
    assert lvcreate_snapshot_argv("san", "web-1", "web-1.nightly", writable=False) == [
        "lvcreate", "--yes", "--snapshot", "--name", "web-1.nightly", "--setactivationskip", "y",
        "--permission", "r", "san/web-1"]
    assert lv_name("web-1@nightly") == "web-1.nightly"
    assert dm_name("san-a", "thin-pool") == "san--a-thin--pool"
    assert pool_message_argv("san-a", "pool", "reserve_metadata_snap") == [
        "dmsetup", "message", "san--a-pool-tpool", "0", "reserve_metadata_snap"]
    assert thin_delta_argv("san-a", "pool", 3, 7) == [
        "thin_delta", "--metadata-snap", "--thin1", "3", "--thin2", "7", "/dev/mapper/san--a-pool_tmeta"]


def test_metadata_only_mode_adds_the_flags_that_keep_lvm_off_device_mapper() -> None:
    backend = LvmThinBackend("san", metadata_only=True)
    data, meta, convert = backend.pool_layout_argv(64 * MiB, 4 * MiB)
    assert backend.lvm(data)[:7] == ["lvcreate", "--driverloaded", "n", "--activate", "n", "--zero", "n"]
    assert backend.lvm(convert)[:3] == ["lvconvert", "--driverloaded", "n"]
    assert convert[-3:] == ["--poolmetadata", "san/pool_meta", "san/pool"]
    assert LvmThinBackend("san").lvm(data) == data
    thin = lvcreate_thin_argv("san", "pool", "linear", MiB)
    assert "--zero" not in backend.lvm(thin), "a volume named 'linear' is still a thin volume"


@pytest.mark.parametrize("verbose", [False, True])
def test_parse_thin_delta_of_real_thin_metadata(tmp_path: Path, verbose: bool) -> None:
    """Real metadata (thin_restore) and real thin_delta output; device 2 changed blocks 1, 5, 6 and dropped 7."""
    need_binary("thin_restore", "thin_delta")
    (tmp_path / "meta.xml").write_text(THIN_METADATA)
    metadata = tmp_path / "meta.bin"
    sparse_file(metadata, 8 * MiB)
    subprocess.run(["thin_restore", "-i", str(tmp_path / "meta.xml"), "-o", str(metadata)], check=True, capture_output=True)
    argv = ["thin_delta", *(["--verbose"] if verbose else []), "--thin1", "1", "--thin2", "2", str(metadata)]
    delta = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    block = 128 * 512
    assert parse_thin_delta(delta) == [(1 * block, block), (5 * block, 2 * block), (7 * block, block)]


@pytest.fixture
def volume_group(tmp_path: Path) -> Iterator[LvmThinBackend]:
    """A real PV and VG (metadata only) on a loop device over a sparse file; removed afterwards."""
    need_root()
    need_binary("pvcreate", "vgcreate", "lvcreate", "lvs", "losetup")
    image = tmp_path / "pv.img"
    sparse_file(image, 128 * MiB)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                            text=True).stdout.strip()
    backend = LvmThinBackend(f"lxt-{secrets.token_hex(4)}", metadata_only=True)
    try:
        backend.create_volume_group([device])
        yield backend
    finally:
        subprocess.run(["vgremove", "--driverloaded", "n", "--force", "--force", "--yes", backend.vg], capture_output=True)
        subprocess.run(["pvremove", "--yes", device], capture_output=True)
        detach_all(image)


@pytest.mark.integration
def test_volume_group_and_pool_lvs_are_made_on_a_loop_device(volume_group: LvmThinBackend) -> None:
    backend = volume_group
    data, meta, _ = backend.pool_layout_argv(64 * MiB, 4 * MiB)
    backend._run(data)
    backend._run(meta)

    lvs = backend.logical_volumes()
    assert {name: (int(row["lv_size"]), row["segtype"]) for name, row in lvs.items()} == {
        "pool": (64 * MiB, "linear"), "pool_meta": (4 * MiB, "linear")}
    facts = backend.facts()
    assert facts["pool_ready"] is False, "the pool is not converted without device-mapper"
    assert facts["device_mapper"] is HAS_DM
    assert facts["total_bytes"] > facts["free_bytes"] >= facts["total_bytes"] - 72 * MiB


@pytest.mark.integration
def test_resize_size_exists_and_delete_on_a_real_lv(volume_group: LvmThinBackend) -> None:
    backend = volume_group
    backend._run(backend.pool_layout_argv(32 * MiB, 4 * MiB)[0])
    assert backend.exists("pool") and not backend.exists("missing")
    backend.resize("pool", 48 * MiB)
    assert backend.size("pool") == 48 * MiB
    with pytest.raises(ShrinkRefused):
        backend.resize("pool", 16 * MiB)
    backend.resize("pool", 16 * MiB, contents_fit=True)
    assert backend.size("pool") == 16 * MiB
    backend.delete("pool")
    backend.delete("pool")
    with pytest.raises(VolumeNotFound):
        backend.size("pool")


@pytest.fixture
def thin_pool(tmp_path: Path) -> Iterator[LvmThinBackend]:
    """A live VG with a thin pool (device-mapper needed), removed afterwards."""
    image = tmp_path / "pv.img"
    sparse_file(image, 256 * MiB)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                            text=True).stdout.strip()
    backend = LvmThinBackend(f"lxt-{secrets.token_hex(4)}")
    try:
        backend.create_volume_group([device])
        backend.create_thin_pool(128 * MiB, 8 * MiB)
        yield backend
    finally:
        subprocess.run(["vgremove", "--force", "--force", "--yes", backend.vg], capture_output=True)
        subprocess.run(["pvremove", "--yes", device], capture_output=True)
        detach_all(image)


@needs_devicemapper
def test_lvm_thin_snapshot_and_changed_ranges_need_devicemapper(thin_pool: LvmThinBackend) -> None:
    backend = thin_pool
    vol = backend.create("vm-1", 32 * MiB)
    path = backend.path_for_export(vol)
    with open(path, "r+b") as f:
        f.write(os.urandom(4 * MiB))
    old = backend.snapshot(vol, "s1")
    with open(path, "r+b") as f:
        f.seek(8 * MiB)
        f.write(os.urandom(4096))
    new = backend.snapshot(vol, "s2")
    assert backend.changed_ranges(old, new) == [(8 * MiB, backend.change_block_size)]
    clone = backend.clone(new, "vm-2")
    with open(path, "rb") as a, open(backend.path_for_export(clone), "rb") as b:
        assert a.read(12 * MiB) == b.read(12 * MiB)


@needs_devicemapper
def test_an_lvm_pool_lists_its_thin_volumes_and_snapshots_needs_devicemapper(thin_pool: LvmThinBackend) -> None:
    backend = thin_pool
    volume = backend.create("vm-1-disk", 8 * MiB)
    backend.snapshot(volume, "bk-1")
    assert backend.listing() == {"vm-1-disk": f"/dev/{backend.vg}/vm-1-disk",
                                 "vm-1-disk@bk-1": f"/dev/{backend.vg}/vm-1-disk.bk-1"}
