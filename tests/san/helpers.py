"""Real components for the SAN tests: filesystems on loop devices, a tgtd of our own."""

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lab.processes import free_port, wait_until
from tests.support import need_binary, need_root
from workers.errors import LaxError
from workers.san.tgt import Tgt

# mkfs.xfs refuses filesystems under 300 MB; the images are sparse, so this costs no disk.
IMAGE_SIZES = {"xfs": "320M", "btrfs": "256M", "ext4": "64M"}
MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}


def loop_devices_of(image: Path) -> list[str]:
    """Loop devices currently backed by `image`."""
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=False).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line]


def detach_all(image: Path) -> None:
    for device in loop_devices_of(image):
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


def mounted_filesystem(fstype: str, tmp_path: Path) -> Iterator[Path]:
    """Make a `fstype` filesystem on a sparse image under `tmp_path`, loop-mount it, yield the mount point;
    unmount and detach the loop device afterwards whatever happened."""
    need_root()
    need_binary(MKFS[fstype][0], "losetup", "mount")
    image, mountpoint = tmp_path / f"{fstype}.img", tmp_path / f"{fstype}-mnt"
    mountpoint.mkdir()
    subprocess.run(["truncate", "-s", IMAGE_SIZES[fstype], str(image)], check=True)
    subprocess.run([*MKFS[fstype], str(image)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True, capture_output=True)
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)
        detach_all(image)


class TgtDaemon:
    """A tgtd of our own on 127.0.0.1:<port> with its own control port; stop() works even half-started."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.control_port = unused_control_port()
        self.log = log
        self.tgt = Tgt(self.control_port)
        self.proc: subprocess.Popen | None = None

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["tgtd", "-f", "--iscsi", f"portal={self.portal}", "-C", str(self.control_port)],
                stdout=log, stderr=log,
            )
        wait_until(self._answers, 10, f"tgtd on control port {self.control_port} to answer")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"tgtd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        return subprocess.run(self.tgt.argv("--op", "show", "--mode", "sys"), capture_output=True).returncode == 0

    def stop(self) -> None:
        """Delete every target, ask tgtd to exit, SIGKILL it after a deadline."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.tgt.stop_daemon()
            self.proc.wait(10)
        except (LaxError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        for leftover in Path("/var/run/tgtd").glob(f"socket.{self.control_port}*"):
            leftover.unlink(missing_ok=True)


def unused_control_port() -> int:
    """A tgtd control port whose socket nobody holds (tgtd keeps one socket per control port)."""
    while True:
        port = secrets.randbelow(30000) + 1000  # tgtd accepts control ports up to 32767
        if not list(Path("/var/run/tgtd").glob(f"socket.{port}*")):
            return port


@contextmanager
def loop_mounted(image: Path, mountpoint: Path, *, offset: int = 0, length: int | None = None,
                 readonly: bool = False) -> Iterator[Path]:
    """Mount the filesystem at byte `offset` of `image`; unmount and detach whatever happens."""
    options = [f"loop,offset={offset}", *([f"sizelimit={length}"] if length else []), *(["ro"] if readonly else [])]
    mountpoint.mkdir(exist_ok=True)
    try:
        subprocess.run(["mount", "-o", ",".join(options), str(image), str(mountpoint)], check=True, capture_output=True)
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)
        detach_all(image)
