"""The lab's `tiny` template: a busybox VM booted by the host's Debian kernel in seconds under TCG.

Built once from packages on this machine, without mounting anything:
- `disk.img`: a raw disk holding only an ext4 root filesystem (made by `mkfs.ext4 -d`) with
  busybox, busybox init and the NoCloud first-boot script (lab/files/rcS);
- `initrd.img`: a gzip'd newc cpio with busybox and the modules the Debian kernel does not
  build in (virtio, virtio_blk, virtio_net, ext4, vfat + their dependencies), whose /init
  (lab/files/initramfs-init) mounts /dev/vda and switch_roots to it;
- `vmlinuz`: a copy of the host's kernel the modules belong to, booted directly by libvirt.
"""

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import zstandard

from errors import TemplateBuildFailed
from workers.command import output, run

# Bump when the layout of what is built changes in a way the inputs below do not show.
BUILD_FORMAT = 1
DISK_SIZE = "64M"
CMDLINE = "console=ttyS0 root=/dev/vda quiet"
BUSYBOX = Path("/bin/busybox")
# The modules the guest needs, in the order the init loads them; dependencies are added
# from modules.dep, and modules built into the kernel are left out.
WANTED_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "virtio_blk", "virtio_net", "crc32c_generic", "ext4", "vfat", "nls_cp437", "nls_ascii",
    # The ACPI power button reaches busybox acpid through evdev, so libvirt's shutdown works.
    "button", "evdev",
)
INPUTS_FILE = "tiny.inputs"


@dataclass(frozen=True)
class TinyTemplate:
    """Everything libvirt needs to boot `tiny`: the root disk to clone, and the direct-boot triple."""

    disk: Path
    kernel: Path
    initrd: Path
    cmdline: str
    kernel_version: str

    def boot_info(self) -> dict[str, Any]:
        """The template's `boot` metadata: direct-boot files, and the console probe that tells it came up
        (its shell prints the boot line it keeps in /etc/laxcluster-boot)."""
        return {"kernel": str(self.kernel.resolve()), "initrd": str(self.initrd.resolve()), "cmdline": self.cmdline,
                "probe": {"send": "cat /etc/laxcluster-boot\n", "expect": r"LAXCLUSTER-BOOT hostname=\S+ ip=\S+"}}


def build_tiny(dest_dir: Path) -> TinyTemplate:
    """Build the tiny template into `dest_dir` and describe it.

    Idempotent: when the outputs exist and were built from the same inputs (kernel, modules,
    busybox, lab/files), nothing is rebuilt. Each output is replaced atomically and the
    inputs stamp is written last, so after a crash mid-build the next call rebuilds.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    version = host_kernel_version()
    modules = module_load_order(version, WANTED_MODULES)
    template = TinyTemplate(
        disk=dest_dir / "disk.img",
        kernel=dest_dir / "vmlinuz",
        initrd=dest_dir / "initrd.img",
        cmdline=CMDLINE,
        kernel_version=version,
    )
    fingerprint = inputs_fingerprint(version, modules)
    stamp = dest_dir / INPUTS_FILE
    outputs = (template.disk, template.kernel, template.initrd)
    if all(p.exists() for p in outputs) and stamp.exists() and stamp.read_text() == fingerprint:
        return template
    stamp.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".build-") as work:
        work_dir = Path(work)
        built_disk = build_root_disk(work_dir)
        built_initrd = build_initramfs(work_dir, version, modules)
        built_kernel = work_dir / "vmlinuz"
        shutil.copyfile(Path("/boot") / f"vmlinuz-{version}", built_kernel)
        for built, final in ((built_disk, template.disk), (built_initrd, template.initrd), (built_kernel, template.kernel)):
            # QEMU runs as an unprivileged user and reads kernel and initrd itself.
            built.chmod(0o644)
            os.replace(built, final)
    dest_dir.chmod(0o755)
    stamp.write_text(fingerprint)
    return template


def host_kernel_version() -> str:
    """The kernel to boot guests with: the running one if its image and modules are installed, else the newest installed."""
    def installed(version: str) -> bool:
        return (Path("/boot") / f"vmlinuz-{version}").exists() and (Path("/lib/modules") / version / "modules.dep").exists()

    running = os.uname().release
    if installed(running):
        return running
    candidates = sorted(p.name.removeprefix("vmlinuz-") for p in Path("/boot").glob("vmlinuz-*"))
    usable = [v for v in candidates if installed(v)]
    if not usable:
        raise TemplateBuildFailed("no kernel with modules under /boot and /lib/modules (install linux-image-amd64)")
    return usable[-1]


def module_load_order(version: str, wanted: tuple[str, ...]) -> list[Path]:
    """Module files (relative to /lib/modules/<version>) to insmod, each after its dependencies."""
    base = Path("/lib/modules") / version
    builtin = {module_name(Path(line)) for line in (base / "modules.builtin").read_text().split()}
    deps: dict[str, tuple[Path, list[Path]]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[module_name(Path(path))] = (Path(path), [Path(p) for p in rest.split()])
    order: list[Path] = []

    def add(name: str) -> None:
        if name in builtin or any(module_name(p) == name for p in order):
            return
        if name not in deps:
            raise TemplateBuildFailed(f"kernel {version} has no module {name}")
        path, needs = deps[name]
        # modules.dep lists dependencies so that loading them last-to-first is safe.
        for dep in reversed(needs):
            add(module_name(dep))
        order.append(path)

    for name in wanted:
        add(name.replace("-", "_"))
    return order


def module_name(path: Path) -> str:
    """`kernel/fs/nls/nls_iso8859-1.ko.xz` -> `nls_iso8859_1` (the kernel's own spelling)."""
    return path.name.split(".ko")[0].replace("-", "_")


def inputs_fingerprint(version: str, modules: list[Path]) -> str:
    """A digest of everything the template is built from; changes when any input does."""
    base = Path("/lib/modules") / version

    def file_id(path: Path) -> list[object]:
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]

    record = {
        "format": BUILD_FORMAT,
        "disk_size": DISK_SIZE,
        "cmdline": CMDLINE,
        "kernel": file_id(Path("/boot") / f"vmlinuz-{version}"),
        "busybox": file_id(BUSYBOX),
        "modules": [file_id(base / m) for m in modules],
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in lab_files()},
    }
    return json.dumps(record, sort_keys=True)


def lab_files() -> Iterator[tuple[str, bytes]]:
    """(name, content) of each file shipped in lab/files."""
    for entry in sorted(resources.files("lab").joinpath("files").iterdir(), key=lambda e: e.name):
        if entry.is_file():
            yield entry.name, entry.read_bytes()


def lab_file(name: str) -> bytes:
    return resources.files("lab").joinpath("files", name).read_bytes()


def install_busybox(root: Path) -> None:
    """Put busybox at /bin/busybox of `root` with a symlink for every applet it has."""
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = output([str(BUSYBOX), "--list-full"]).split()
    for applet in applets:
        link = root / applet
        if link == root / "bin" / "busybox" or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def write_file(path: Path, content: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(mode)


def build_root_disk(work_dir: Path) -> Path:
    """A raw image whose whole content is the ext4 root filesystem of tiny."""
    root = work_dir / "root"
    install_busybox(root)
    for directory in ("dev", "proc", "sys", "tmp", "run", "root", "mnt/seed", "var/log", "etc/init.d"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "root").chmod(0o700)
    (root / "tmp").chmod(0o1777)
    write_file(root / "etc/inittab", lab_file("inittab"), 0o644)
    write_file(root / "etc/init.d/rcS", lab_file("rcS"), 0o755)
    write_file(root / "etc/profile", lab_file("profile"), 0o644)
    write_file(root / "etc/udhcpc/default.script", lab_file("udhcpc-script"), 0o755)
    write_file(root / "etc/acpi/PWRF/00000080", lab_file("acpi-power-button"), 0o755)
    write_file(root / "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    write_file(root / "etc/group", b"root:x:0:\n", 0o644)
    write_file(root / "etc/hostname", b"tiny\n", 0o644)
    disk = work_dir / "disk.img"
    run(["mkfs.ext4", "-q", "-F", "-L", "tiny-root", "-E", "root_owner=0:0", "-d", str(root), str(disk), DISK_SIZE])
    return disk


def build_initramfs(work_dir: Path, version: str, modules: list[Path]) -> Path:
    """A gzip'd newc cpio: busybox, the modules in load order, and lab/files/initramfs-init as /init."""
    root = work_dir / "initramfs"
    install_busybox(root)
    for directory in ("dev", "proc", "sys", "newroot", "modules"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    write_file(root / "init", lab_file("initramfs-init"), 0o755)
    names = []
    for module in modules:
        name = module_name(module)
        write_file(root / "modules" / f"{name}.ko", read_module(Path("/lib/modules") / version / module), 0o644)
        names.append(name)
    write_file(root / "modules" / "order", ("\n".join(names) + "\n").encode(), 0o644)
    initrd = work_dir / "initrd.img"
    with gzip.open(initrd, "wb", compresslevel=6) as out:
        write_newc(root, out)
    return initrd


def read_module(path: Path) -> bytes:
    """The module's ELF bytes; busybox insmod cannot read compressed modules."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def write_newc(root: Path, out: io.BufferedIOBase) -> None:
    """Write the tree under `root` as a newc cpio archive, every entry owned by root."""
    paths = sorted(root.rglob("*"))
    for ino, path in enumerate(paths, start=1):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            data = os.readlink(path).encode()
        elif stat.S_ISREG(st.st_mode):
            data = path.read_bytes()
        else:
            data = b""
        write_newc_entry(out, str(path.relative_to(root)), st.st_mode, ino, data)
    write_newc_entry(out, "TRAILER!!!", 0, 0, b"")


def write_newc_entry(out: io.BufferedIOBase, name: str, mode: int, ino: int, data: bytes) -> None:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.write(header + encoded + pad4(len(header) + len(encoded)))
    out.write(data + pad4(len(data)))


def pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)
