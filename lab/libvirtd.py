"""One libvirtd (with its virtlogd and virtlockd) per cluster server (and per SAN host given one), each a host of its own.

The daemons run in the server's network namespace and in a mount + UTS namespace of their own:
hostname = the server's name, and /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt,
/var/log/libvirt and /run/libvirt bind-mounted from `<lab_dir>/<server>/`, so the host's own
libvirt (and the other servers') is never touched. `python -m lab.libvirtd boot DIR HOSTNAME` is
the part that runs inside those namespaces.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import libvirt

from errors import LabError
from lab import processes
from workers.node.host import answers_tcp

DAEMONS = ("virtlogd", "virtlockd", "libvirtd")
# Per-server directory name -> where the server's daemons see it.
BINDS = {
    "etc": Path("/etc/libvirt"),
    "lib": Path("/var/lib/libvirt"),
    "cache": Path("/var/cache/libvirt"),
    "log": Path("/var/log/libvirt"),
    "run": Path("/run/libvirt"),
}
BOOT_TIMEOUT_S = 60

# libvirt prints every failed call to stderr by default; a probe that fails is an answer, not noise.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@dataclass(frozen=True)
class ServerDaemons:
    """Where one server's libvirt daemons keep their files, and how to tell their PIDs."""

    name: str
    netns: str
    mgmt_address: str
    host_uuid: str
    directory: Path

    def pidfile(self, daemon: str) -> Path:
        return self.directory / "pids" / f"{daemon}.pid"

    def pids(self) -> dict[str, int | None]:
        """Each daemon's PID if it is alive and ours (its argv names our pidfile), else None."""
        return {daemon: self._live_pid(daemon) for daemon in DAEMONS}

    def _live_pid(self, daemon: str) -> int | None:
        token = str(self.pidfile(daemon))
        pid = processes.read_pidfile(self.pidfile(daemon))
        if processes.is_ours(pid, daemon, token):
            return pid
        # The pidfile may be gone (a crash, a wiped run directory) while the daemon lives on.
        found = processes.find(daemon, token)
        return found[0] if found else None


def start(server: ServerDaemons) -> dict[str, int]:
    """Start the server's three daemons unless all already run; return their PIDs.

    libvirtd answers only some seconds later: wait with `wait_answering`.
    """
    running = server.pids()
    if all(running.values()):
        return {daemon: pid for daemon, pid in running.items() if pid}
    stop(server)
    _prepare_directories(server)
    _write_configs(server)
    argv = [
        "ip", "netns", "exec", server.netns,
        # slave: the unmount of a (shared) pool reaches this namespace too, should it hold a copy.
        "unshare", "--mount", "--uts", "--propagation", "slave",
        sys.executable, "-m", "lab.libvirtd", "boot", str(server.directory), server.name,
    ]
    with open(server.directory / "boot.log", "ab") as log:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=BOOT_TIMEOUT_S, check=False)
    pids = server.pids()
    if proc.returncode != 0 or not all(pids.values()):
        raise LabError(f"libvirt daemons of {server.name} did not start (exit {proc.returncode}); see {server.directory / 'boot.log'}")
    return {daemon: pid for daemon, pid in pids.items() if pid}


def stop(server: ServerDaemons) -> None:
    """Stop whichever of the server's daemons run and forget their sockets and pidfiles; harmless if none runs."""
    processes.stop(pid for pid in server.pids().values() if pid)
    for name in ("run", "pids"):
        shutil.rmtree(server.directory / name, ignore_errors=True)


def hostname_over_tcp(uri: str) -> str | None:
    """The hostname libvirtd at `uri` reports, or None if it does not answer (yet)."""
    if not answers_tcp(uri):
        return None
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return None
    try:
        return conn.getHostname()
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def wait_answering(uri: str, hostname: str, timeout: float = 90) -> None:
    """Return once libvirtd at `uri` answers with `hostname`; LabError after `timeout` s."""
    processes.wait_until(lambda: hostname_over_tcp(uri) == hostname, timeout, f"libvirtd at {uri} to answer as {hostname}", interval=0.5)


def _prepare_directories(server: ServerDaemons) -> None:
    d = server.directory
    if not (d / "etc").exists():
        # Domain definitions of whoever uses the host's libvirt are not ours to copy.
        shutil.copytree(BINDS["etc"], d / "etc", symlinks=True, ignore=_host_domains)
    for name in ("lib", "cache"):
        if not (d / name).exists():
            _copy_directory_tree(BINDS[name], d / name)
    for name in ("log", "run", "pids"):
        (d / name).mkdir(parents=True, exist_ok=True)


def _host_domains(directory: str, names: list[str]) -> list[str]:
    if Path(directory) == BINDS["etc"] / "qemu":
        return [n for n in names if n.endswith(".xml") or n == "autostart"]
    return []


def _copy_directory_tree(src: Path, dst: Path) -> None:
    # Only the directories with their owners and modes (libvirt-qemu owns some): no host state.
    for source in [src, *sorted(p for p in src.rglob("*") if p.is_dir() and not p.is_symlink())]:
        target = dst / source.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        stat = source.stat()
        shutil.chown(target, stat.st_uid, stat.st_gid)
        target.chmod(stat.st_mode & 0o7777)


def _write_configs(server: ServerDaemons) -> None:
    libvirtd_conf = {
        "listen_tcp": "1",
        "listen_tls": "0",
        "auth_tcp": '"none"',
        "listen_addr": f'"{server.mgmt_address}"',
        "host_uuid": f'"{server.host_uuid}"',
        "log_outputs": '"3:file:/var/log/libvirt/libvirtd.log"',
    }
    # The lab's hosts share one filesystem whose test directories are private to root (pytest's
    # are 0700): QEMU runs as root here so it can read kernels and images wherever they are.
    qemu_conf = {"user": '"root"', "group": '"root"'}
    for name, settings in (("libvirtd.conf", libvirtd_conf), ("qemu.conf", qemu_conf)):
        text = "# Written by the LaxCluster lab on every `lab up`.\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        (server.directory / "etc" / name).write_text(text)


def _boot(directory: Path, hostname: str) -> None:
    """Inside the server's fresh mount + UTS namespace: bind its directories, name it, start the daemons."""
    for name, target in BINDS.items():
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(directory / name), str(target)], check=True)
    socket.sethostname(hostname)
    pids = directory / "pids"
    subprocess.run(["virtlogd", "-d", "-p", str(pids / "virtlogd.pid")], stdin=subprocess.DEVNULL, check=True)
    subprocess.run(["virtlockd", "-d", "-p", str(pids / "virtlockd.pid")], stdin=subprocess.DEVNULL, check=True)
    subprocess.run(["libvirtd", "-d", "--listen", "-p", str(pids / "libvirtd.pid")], stdin=subprocess.DEVNULL, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.libvirtd")
    sub = parser.add_subparsers(dest="command", required=True)
    boot = sub.add_parser("boot", help="run inside a server's namespaces: bind its libvirt dirs, start its daemons")
    boot.add_argument("directory", type=Path)
    boot.add_argument("hostname")
    args = parser.parse_args(argv)
    _boot(args.directory, args.hostname)


if __name__ == "__main__":
    main()
