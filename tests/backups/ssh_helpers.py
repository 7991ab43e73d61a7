"""An sshd of our own on a free loopback port, with generated host and client keys, for the SSH store."""

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lab.processes import free_port, wait_until
from tests.support import need_binary, need_root

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


@dataclass
class SshServer:
    port: int
    private_key: str
    host_key_line: str


def make_key(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def run_sshd(workdir: Path) -> Iterator[SshServer]:
    """An SshServer for root on 127.0.0.1 (key login only, SFTP in process); stopped by PID after."""
    need_root()
    need_binary(SSHD, "ssh-keygen")
    workdir.mkdir(parents=True, exist_ok=True)
    host_key, client_key = workdir / "host_ed25519", workdir / "client_ed25519"
    make_key(host_key)
    make_key(client_key)
    shutil.copy(f"{client_key}.pub", workdir / "authorized_keys")
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"AuthorizedKeysFile {workdir}/authorized_keys",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no", f"PidFile {workdir}/sshd.pid", "Subsystem sftp internal-sftp", ""]))
    made_privsep = not PRIVSEP_DIR.exists()
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    log = open(workdir / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    try:
        wait_until(lambda: proc.poll() is None and accepts(port) or _exited(proc, workdir), 10, "sshd to listen")
        key_type, key_b64 = Path(f"{host_key}.pub").read_text().split()[:2]
        yield SshServer(port, client_key.read_text(), f"[127.0.0.1]:{port} {key_type} {key_b64}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        if made_privsep:
            os.rmdir(PRIVSEP_DIR)


def _exited(proc: subprocess.Popen, workdir: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"sshd exited {proc.returncode}: {(workdir / 'sshd.log').read_text()[-2000:]}")
    return False
