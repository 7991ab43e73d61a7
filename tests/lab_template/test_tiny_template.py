"""The tiny template is built from the machine's own kernel and busybox, without mounting."""

import gzip
import lzma
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from lab.template import TinyTemplate, build_tiny, host_kernel_version, module_load_order, module_name, read_module
from tests.support import need_binary

VIRTIO_ORDER = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyTemplate]:
    need_binary("mkfs.ext4", "debugfs", "busybox")
    yield build_tiny(tmp_path_factory.mktemp("tiny"))


def newc_names(initrd: Path) -> set[str]:
    """Entry names of a gzip'd newc archive, read back with GNU cpio."""
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=gzip.decompress(initrd.read_bytes()), capture_output=True, check=True)
    return set(listing.stdout.decode().split())


def initrd_file(initrd: Path, name: str) -> bytes:
    return subprocess.run(
        ["cpio", "-i", "--quiet", "--to-stdout", name], input=gzip.decompress(initrd.read_bytes()), capture_output=True, check=True
    ).stdout


def test_template_has_the_direct_boot_triple(built: TinyTemplate) -> None:
    assert built.kernel.read_bytes() == Path(f"/boot/vmlinuz-{built.kernel_version}").read_bytes()
    assert "console=ttyS0" in built.cmdline
    assert built.disk.stat().st_size == 64 * 1024 * 1024
    for path in (built.disk, built.kernel, built.initrd):
        assert path.stat().st_mode & 0o004, f"{path} must be readable by QEMU's user"


def test_initramfs_loads_virtio_before_the_disk_and_ext4_after_its_deps(built: TinyTemplate) -> None:
    names = newc_names(built.initrd)
    assert {"init", "bin/busybox", "bin/sh", "sbin/switch_root", "sbin/insmod"} <= names
    order = initrd_file(built.initrd, "modules/order").decode().split()
    assert [m for m in order if m in VIRTIO_ORDER] == VIRTIO_ORDER
    assert order.index("jbd2") < order.index("ext4") and order.index("mbcache") < order.index("ext4")
    assert order.index("fat") < order.index("vfat")
    for module in order:
        assert f"modules/{module}.ko" in names
        assert initrd_file(built.initrd, f"modules/{module}.ko")[:4] == b"\x7fELF", f"{module} must be uncompressed"
    assert initrd_file(built.initrd, "init").startswith(b"#!/bin/sh")


def test_root_disk_is_an_ext4_busybox_system(built: TinyTemplate) -> None:
    blkid = subprocess.run(["blkid", "-o", "export", str(built.disk)], capture_output=True, text=True, check=True).stdout
    assert "TYPE=ext4" in blkid
    for path in ("/bin/busybox", "/etc/inittab", "/etc/init.d/rcS", "/etc/udhcpc/default.script"):
        stat = subprocess.run(["debugfs", "-R", f"stat {path}", str(built.disk)], capture_output=True, text=True)
        assert "Type: regular" in stat.stdout, f"{path} missing from the root disk: {stat.stderr}"
    init = subprocess.run(["debugfs", "-R", "stat /sbin/init", str(built.disk)], capture_output=True, text=True)
    assert "Type: symlink" in init.stdout and "/bin/busybox" in init.stdout


def test_build_is_skipped_when_inputs_are_unchanged_and_redone_when_they_change(built: TinyTemplate) -> None:
    before = {p: p.stat().st_mtime_ns for p in (built.disk, built.initrd, built.kernel)}
    assert build_tiny(built.disk.parent) == built
    assert {p: p.stat().st_mtime_ns for p in before} == before
    (built.disk.parent / "tiny.inputs").write_text("stale")
    build_tiny(built.disk.parent)
    assert built.initrd.stat().st_mtime_ns != before[built.initrd]
    built.initrd.unlink()
    build_tiny(built.disk.parent)
    assert built.initrd.exists()
    assert not [p for p in built.disk.parent.iterdir() if p.name.startswith(".build-")]


def test_module_order_puts_dependencies_first_and_skips_builtins() -> None:
    version = host_kernel_version()
    order = [module_name(p) for p in module_load_order(version, ("virtio_blk", "ext4"))]
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_blk")
    assert order[-1] == "ext4" and "crc16" in order
    assert len(order) == len(set(order))


@pytest.mark.parametrize(
    ("suffix", "compress"),
    [(".ko", bytes), (".ko.xz", lzma.compress), (".ko.zst", zstandard.ZstdCompressor().compress), (".ko.gz", gzip.compress)],
)
def test_compressed_modules_are_decompressed(tmp_path: Path, suffix: str, compress: Callable[[bytes], bytes]) -> None:
    elf = b"\x7fELF" + os.urandom(64)
    module = tmp_path / f"m{suffix}"
    module.write_bytes(compress(elf))
    assert read_module(module) == elf
