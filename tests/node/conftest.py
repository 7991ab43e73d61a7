"""Fixtures for the node worker: the root libvirtd (a tgtd: tests/conftest.py; the tiny template: tests/fixtures/lab_vms.py)."""

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from lab.processes import wait_until
from workers.node.console import start_event_loop
from tests.support import need_binary, need_root

SYSTEM_URI = "qemu:///system"


def libvirt_answers(uri: str) -> bool:
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError:
        return False
    return True


def stop_by_pidfile(pidfile: Path) -> None:
    """SIGTERM the daemon named in `pidfile` and wait until it is gone."""
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text().strip())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    # Daemons started with -d are not our children: gone means no /proc entry.
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, f"pid {pid} to exit")


@pytest.fixture(scope="session")
def system_libvirt() -> Iterator[libvirt.virConnect]:
    """A connection to qemu:///system; starts the root libvirtd (and its log/lock daemons) if none answers, stops what it started."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    start_event_loop()
    started: list[Path] = []
    if not libvirt_answers(SYSTEM_URI):
        need_root()
        need_binary("libvirtd", "virtlogd", "virtlockd")
        rundir = Path(tempfile.mkdtemp(prefix="laxcluster-libvirtd-"))
        for daemon in ("virtlogd", "virtlockd", "libvirtd"):
            pidfile = rundir / f"{daemon}.pid"
            subprocess.run([daemon, "-d", "-p", str(pidfile)], check=True)
            started.append(pidfile)
    try:
        # libvirtd probes QEMU's capabilities before its first answer (~10 s here).
        wait_until(lambda: libvirt_answers(SYSTEM_URI), 60, "libvirtd to answer on qemu:///system", interval=0.5)
        conn = libvirt.open(SYSTEM_URI)
        yield conn
        conn.close()
    finally:
        for pidfile in reversed(started):
            stop_by_pidfile(pidfile)
        if started:
            shutil.rmtree(started[0].parent, ignore_errors=True)
