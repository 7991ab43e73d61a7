"""A VM network's DHCP server as files: the hosts file dnsmasq serves exactly the leases from
(`--dhcp-hostsfile`, lines `MAC,IP,hostname`), replaced atomically and reloaded with SIGHUP.

Whoever runs the DHCP server (the lab, or an operator with the same flags) gives it the paths
below under one directory (the config's `dhcp_dir`), so the writer and the server agree on them.
A lease given back is also released in dnsmasq's lease database (`dhcp_release`, from dnsmasq-utils,
on the interface it serves): otherwise dnsmasq keeps the address for the old MAC and refuses it to the
next VM the network DB gives it to.
"""

import os
import signal
from pathlib import Path

from workers.command import run


def hosts_path(directory: Path, network: str) -> Path:
    return directory / f"{network}.hosts"


def pid_path(directory: Path, network: str) -> Path:
    return directory / f"{network}.pid"


def publish_hosts(directory: Path, network: str, text: str) -> bool:
    """Make `text` the network's hosts file, tell its dnsmasq to re-read it and release the leases that left
    it; False when no dnsmasq runs (it reads the file when it starts)."""
    # Absolute, as the DHCP server was given them: its pidfile argument is how we know it is ours.
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    path = hosts_path(directory, network)
    gone = host_entries(path.read_text() if path.exists() else "") - host_entries(text)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)
    pid = running_dnsmasq(pid_path(directory, network))
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    interface = _option(pid, "--interface")
    for mac, ip in sorted(gone):
        run(["dhcp_release", interface, ip, mac])
    return True


def host_entries(text: str) -> set[tuple[str, str]]:
    """The (MAC, IP) pairs of a hosts file."""
    return {(fields[0], fields[1]) for line in text.splitlines() if len(fields := line.split(",")) >= 2}


def running_dnsmasq(pidfile: Path) -> int | None:
    """The PID in `pidfile` if it is a live dnsmasq started with that pidfile (a recycled PID is not ours)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    argv = _argv(pid)
    ours = bool(argv) and Path(argv[0]).name == "dnsmasq" and f"--pid-file={pidfile}" in argv
    return pid if ours else None


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _option(pid: int, name: str) -> str:
    """The value of `--name=value` in dnsmasq `pid`'s command line: where it serves is where to release."""
    return next(arg.split("=", 1)[1] for arg in _argv(pid) if arg.startswith(f"{name}="))
