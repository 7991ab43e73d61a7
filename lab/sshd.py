"""The lab's sshds: each started in its host's network namespace, with a host key generated once.

One code path serves two kinds of host. A backup host (`BackupHost`) listens on its backup address,
port 22, and authorizes only a client key of its own, made beside its host key under
`<lab_dir>/<host>/`; the SAN worker logs in with it to reach an `ssh` backup store. A SAN host
listens on its replication address for the peer SAN's worker, authorizing only the replication
key of the config. Under the host's directory: `ssh_host_ed25519_key`, `authorized_keys`,
`sshd_config`, `sshd.pid`, `sshd.log`.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from errors import LabError
from lab import processes
from workers.command import run

START_TIMEOUT_S = 15
SSH_PORT = 22


@dataclass(frozen=True)
class SshHost:
    """An sshd on `address`:`port` inside `netns`; `authorized_key` is the public half of the one key let in (as root)."""

    name: str
    netns: str
    address: str
    port: int
    directory: Path
    authorized_key: Path

    @property
    def host_key(self) -> Path:
        return self.directory / "ssh_host_ed25519_key"

    @property
    def config(self) -> Path:
        return self.directory / "sshd_config"

    @property
    def pidfile(self) -> Path:
        return self.directory / "sshd.pid"

    @property
    def log(self) -> Path:
        return self.directory / "sshd.log"

    def known_hosts_line(self) -> str:
        """`<address> <type> <base64>` (`[address]:port` off port 22): what a client trusting this host alone needs."""
        key_type, key_b64 = public_half(self.host_key).read_text().split()[:2]
        name = self.address if self.port == SSH_PORT else f"[{self.address}]:{self.port}"
        return f"{name} {key_type} {key_b64}"


@dataclass(frozen=True)
class BackupHost(SshHost):
    """A backup host's sshd: port 22, a store directory, and a client key of its own as the authorized one."""

    @classmethod
    def at(cls, name: str, netns: str, address: str, directory: Path) -> BackupHost:
        return cls(name, netns, address, SSH_PORT, directory, public_half(directory / "client_ed25519"))

    @property
    def client_key(self) -> Path:
        return self.authorized_key.with_suffix("")

    @property
    def store(self) -> Path:
        return self.directory / "store"

    def prepare(self) -> None:
        """Make the store and the client key (once)."""
        self.store.mkdir(parents=True, exist_ok=True)
        ensure_key(self.client_key, f"laxcluster-lab-{self.name}")


def public_half(key: Path) -> Path:
    """Where ssh-keygen put the public half of private key `key`."""
    return key.with_name(key.name + ".pub")


def ensure_key(key: Path, comment: str) -> None:
    """Generate an ed25519 key pair without passphrase at `key` (and `key`.pub) unless it exists."""
    if key.exists():
        return
    key.parent.mkdir(parents=True, exist_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])


def configure(host: SshHost) -> None:
    """Generate the host key once; (re)write authorized_keys (a copy of the authorized key) and the config.

    Rewritten on every `up` so a replaced client key is let in without restarting sshd (it reads
    authorized_keys at each login)."""
    host.directory.mkdir(parents=True, exist_ok=True)
    ensure_key(host.host_key, f"laxcluster-lab-{host.name}")
    authorized_keys = host.directory / "authorized_keys"
    authorized_keys.write_text(host.authorized_key.read_text())
    host.config.write_text(
        f"ListenAddress {host.address}:{host.port}\n"
        f"HostKey {host.host_key}\n"
        f"AuthorizedKeysFile {authorized_keys}\n"
        f"PidFile {host.pidfile}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n"
    )


def ensure(host: SshHost, recorded: int | None) -> int:
    """Configure the host's sshd and return its PID: `recorded` (or the pidfile's) if that one still runs, else a new one."""
    configure(host)
    return running_pid(host, recorded) or start(host)


def running_pid(host: SshHost, recorded: int | None) -> int | None:
    """`recorded`, else the PID in sshd's pidfile (state.json may be lost), if it is still our sshd.

    sshd rewrites its command line ("sshd: ... [listener]"), so the config path is looked for anywhere
    in it rather than as an argument."""
    for pid in (recorded, processes.read_pidfile(host.pidfile)):
        title = " ".join(processes.cmdline(pid)) if pid else ""
        if "sshd" in title and str(host.config) in title:
            return pid
    return None


def start(host: SshHost) -> int:
    """Start sshd in the host's namespace on its address; return its PID once it accepts connections.

    Only the network namespace is entered: sshd, and what a login runs, share the root mount
    namespace, so a SAN's login sees its pool mounted."""
    # sshd's privilege separation directory; a package install normally makes it.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    argv = ["nsenter", f"--net=/run/netns/{host.netns}", "/usr/sbin/sshd", "-D", "-f", str(host.config), "-E", str(host.log)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    processes.wait_until(lambda: answers(host) or proc.poll() is not None, START_TIMEOUT_S, f"sshd of {host.name}")
    if proc.poll() is not None:
        raise LabError(f"sshd of {host.name} exited with {proc.returncode}; see {host.log}")
    return proc.pid


def stop(host: SshHost, recorded: int | None) -> None:
    """Stop the host's sshd listener if it runs (its login sessions live in the host's namespace: `down` sweeps them)."""
    pid = running_pid(host, recorded)
    if pid:
        processes.stop([pid])


def answers(host: SshHost) -> bool:
    """True if the host's sshd accepts TCP connections and greets with an SSH banner."""
    try:
        with socket.create_connection((host.address, host.port), timeout=2) as conn:
            return conn.recv(8).startswith(b"SSH-")
    except OSError:
        return False

