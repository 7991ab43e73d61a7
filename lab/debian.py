"""The `debian` template: Debian 12 with systemd, cloud-init, openssh-server and its own kernel, built on this
machine by debootstrap from the Debian archive apt already uses (its sources list), so a VM of it is a real
server: the real cloud-init reads LaxCluster's NoCloud seed (hostname, address, DNS, SSH keys).

Built once into `<dest_dir>` (the lab puts it under the import directory): `disk.img`, a raw disk holding
one ext4 root filesystem (`mkfs.ext4 -d`, nothing mounted), and the image's own `vmlinuz` and `initrd.img`,
which libvirt boots directly like `tiny`'s. A stamp of the inputs is written last; a build interrupted
half-way is redone. Takes some minutes (debootstrap and the kernel's initramfs); `tiny` stays for fast tests.
"""

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import TemplateBuildFailed
from workers.command import run

BUILD_FORMAT = 1
SUITE = "bookworm"
DISK_SIZE = "2G"
CMDLINE = "console=ttyS0 root=/dev/vda rw net.ifnames=0"
# debootstrap resolves no virtual packages: python3-cffi-backend provides what python3-cryptography (for
# cloud-init) asks for by a virtual name.
PACKAGES = ("systemd-sysv", "udev", "dbus", "linux-image-amd64", "cloud-init", "openssh-server", "ifupdown",
            "isc-dhcp-client", "iproute2", "netbase", "python3-cffi-backend")
INPUTS_FILE = "debian.inputs"
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
# Only NoCloud: cloud-init would otherwise spend minutes probing cloud metadata services.
CLOUD_CFG = """datasource_list: [NoCloud, None]
disable_root: false
ssh_pwauth: false
"""
FSTAB = "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n"


@dataclass(frozen=True)
class DebianTemplate:
    disk: Path
    kernel: Path
    initrd: Path
    cmdline: str

    def boot_info(self) -> dict[str, Any]:
        """The template's `boot` metadata: direct-boot files, and the console probe that tells it came up (the
        serial getty's login prompt, printed once systemd has started it)."""
        return {"kernel": str(self.kernel.resolve()), "initrd": str(self.initrd.resolve()), "cmdline": self.cmdline,
                "probe": {"send": "\n", "expect": r"\S+ login:"}}


def build_debian(dest_dir: Path, mirror: str | None = None) -> DebianTemplate:
    """Build the debian template into `dest_dir` (nothing to do when it was built from the same inputs)."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    template = DebianTemplate(dest_dir / "disk.img", dest_dir / "vmlinuz", dest_dir / "initrd.img", CMDLINE)
    mirror = mirror or apt_mirror()
    fingerprint = json.dumps({"format": BUILD_FORMAT, "suite": SUITE, "mirror": mirror, "packages": PACKAGES,
                              "disk_size": DISK_SIZE, "cmdline": CMDLINE, "cloud_cfg": CLOUD_CFG}, sort_keys=True)
    stamp = dest_dir / INPUTS_FILE
    if all(p.exists() for p in (template.disk, template.kernel, template.initrd)) and stamp.exists() \
            and stamp.read_text() == fingerprint:
        return template
    stamp.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".build-") as work:
        work_dir = Path(work)
        root = work_dir / "root"
        bootstrap(root, mirror)
        configure(root)
        built_kernel, built_initrd = boot_files(root, work_dir)
        built_disk = root_disk(root, work_dir)
        for built, final in ((built_disk, template.disk), (built_kernel, template.kernel),
                             (built_initrd, template.initrd)):
            built.chmod(0o644)  # QEMU reads kernel and initrd itself
            os.replace(built, final)
    dest_dir.chmod(0o755)
    stamp.write_text(fingerprint)
    return template


def apt_mirror() -> str:
    """The Debian archive this machine's apt uses: the first `URIs:` (deb822) or `deb` line naming one."""
    for path in APT_SOURCES:
        if not path.exists():
            continue
        text = path.read_text()
        found = re.search(r"^URIs:\s*(\S+)", text, re.M) or re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.M)
        if found and "security" not in found[1]:
            return found[1]
    raise TemplateBuildFailed("no Debian archive in apt's sources (/etc/apt/sources.list.d/debian.sources)")


def bootstrap(root: Path, mirror: str) -> None:
    run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), mirror],
        timeout=3600)


def configure(root: Path) -> None:
    """What the first boot needs that debootstrap leaves out: the root in fstab, cloud-init on NoCloud only,
    no machine-id (each clone makes its own), and a name that the seed replaces."""
    (root / "etc" / "fstab").write_text(FSTAB)
    (root / "etc" / "cloud" / "cloud.cfg.d" / "99-laxcluster.cfg").write_text(CLOUD_CFG)
    (root / "etc" / "hostname").write_text("debian\n")
    (root / "etc" / "machine-id").write_text("")
    (root / "var" / "lib" / "dbus" / "machine-id").unlink(missing_ok=True)
    # Host keys are made per VM at first boot (cloud-init's ssh module), never shared by every clone.
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (root / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True)


def boot_files(root: Path, work_dir: Path) -> tuple[Path, Path]:
    """Copies of the image's kernel and initramfs, to boot it directly."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise TemplateBuildFailed("debootstrap installed no kernel (linux-image-amd64)")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    kernel, initrd = work_dir / "vmlinuz", work_dir / "initrd.img"
    shutil.copyfile(kernels[-1], kernel)
    shutil.copyfile(root / "boot" / f"initrd.img-{version}", initrd)
    return kernel, initrd


def root_disk(root: Path, work_dir: Path) -> Path:
    disk = work_dir / "disk.img"
    run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(disk), DISK_SIZE], timeout=1200)
    return disk
