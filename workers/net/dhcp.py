"""A VM network's DHCP server as files: the hosts file dnsmasq serves exactly the leases from
(`--dhcp-hostsfile`, lines `MAC,IP,hostname`), replaced atomically and reloaded with SIGHUP.

Whoever runs the DHCP server (the lab, or an operator with the same flags) gives it the paths
below under one directory (the config's `dhcp_dir`), so the writer and the server agree on them.
"""

import os
import signal
from pathlib import Path


def hosts_path(directory: Path, network: str) -> Path:
    return directory / f"{network}.hosts"


def pid_path(directory: Path, network: str) -> Path:
    return directory / f"{network}.pid"


def publish_hosts(directory: Path, network: str, text: str) -> bool:
    """Make `text` the network's hosts file and tell its dnsmasq to re-read it; False when none runs (it
    reads the file when it starts)."""
    # Absolute, as the DHCP server was given them: its pidfile argument is how we know it is ours.
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    path = hosts_path(directory, network)
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
    return True


def running_dnsmasq(pidfile: Path) -> int | None:
    """The PID in `pidfile` if it is a live dnsmasq started with that pidfile (a recycled PID is not ours)."""
    try:
        pid = int(pidfile.read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    ours = Path(argv[0].decode(errors="replace")).name == "dnsmasq" and f"--pid-file={pidfile}".encode() in argv
    return pid if ours else None
