"""A backup host's sshd: started in the host's network namespace, with keys generated once.

The lab makes three files under `<lab_dir>/<host>/`: the host key, a client key whose public
half is the only authorized key, and the sshd config. The SAN worker, in the root namespace,
logs in as root with the client key over the backup network.
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
class BackupHost:
    name: str
    netns: str
    address: str
    directory: Path

    @property
    def client_key(self) -> Path:
        return self.directory / "client_ed25519"

    @property
    def store(self) -> Path:
        return self.directory / "store"

    @property
    def config(self) -> Path:
        return self.directory / "sshd_config"


def ensure_keys(host: BackupHost) -> None:
    """Generate the host key and the client key once; (re)write authorized_keys and the config."""
    host.directory.mkdir(parents=True, exist_ok=True)
    host.store.mkdir(exist_ok=True)
    for key in (host.directory / "ssh_host_ed25519_key", host.client_key):
        if not key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"laxcluster-lab-{host.name}", "-f", str(key)])
    (host.directory / "authorized_keys").write_text(host.client_key.with_suffix(".pub").read_text())
    host.config.write_text(
        f"ListenAddress {host.address}:{SSH_PORT}\n"
        f"HostKey {host.directory / 'ssh_host_ed25519_key'}\n"
        f"AuthorizedKeysFile {host.directory / 'authorized_keys'}\n"
        f"PidFile {host.directory / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n"
    )


def running_pid(host: BackupHost, recorded: int | None) -> int | None:
    """`recorded` if it is still our sshd. sshd rewrites its command line ("sshd: ... [listener]"),
    so the config path is looked for anywhere in it rather than as an argument."""
    if not recorded:
        return None
    try:
        cmdline = Path(f"/proc/{recorded}/cmdline").read_bytes()
    except OSError:
        return None
    return recorded if b"sshd" in cmdline and str(host.config).encode() in cmdline else None


def start(host: BackupHost) -> int:
    """Start sshd in the host's namespace on its backup address; return its PID once it accepts connections."""
    ensure_keys(host)
    # sshd's privilege separation directory; a package install normally makes it.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    argv = ["nsenter", f"--net=/run/netns/{host.netns}", "/usr/sbin/sshd", "-D", "-f", str(host.config),
            "-E", str(host.directory / "sshd.log")]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    processes.wait_until(lambda: answers(host) or proc.poll() is not None, START_TIMEOUT_S, f"sshd of {host.name}")
    if proc.poll() is not None:
        raise LabError(f"sshd of {host.name} exited with {proc.returncode}; see {host.directory / 'sshd.log'}")
    return proc.pid


def answers(host: BackupHost) -> bool:
    """True if the host's sshd accepts TCP connections and greets with an SSH banner."""
    try:
        with socket.create_connection((host.address, SSH_PORT), timeout=2) as conn:
            return conn.recv(8).startswith(b"SSH-")
    except OSError:
        return False
