"""The way from a sending SAN to the receiver of a ship: `workers.san.receive` run on the peer SAN host
over SSH (paramiko, the peer's host key must be known), or run here as a child process (a local peer).

Both give a `workers.san.replication.Channel`: the receiver's stdin to write, its stdout to read, and
`close()`, which ends its stdin, waits for it to exit and raises ReplicationBroken (with the end of
its stderr) when it failed.
"""

import contextlib
import shlex
import subprocess
import tempfile
from pathlib import Path

import paramiko

from errors import LaxError, PeerUnreachable, ReplicationBroken
from workers.san.ssh_store import load_private_key

# A ship waits this long at most for the peer to take or give a byte (its commit syncs whole disks).
IDLE_TIMEOUT_S = 600
EXIT_TIMEOUT_S = 60
STDERR_TAIL = 2000


class ProcessChannel:
    """The receiver as a child process of ours (no shell); its stderr goes to a file read at close."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)

    def write(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def read(self, n: int) -> bytes:
        return self.process.stdout.read(n)

    def close(self) -> None:
        # Data still buffered for a receiver that is gone cannot be flushed: that is no news here.
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        status = self._wait()
        self.process.stdout.close()
        with self.stderr:
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace")[-STDERR_TAIL:]
        if status:
            raise ReplicationBroken(f"the receiver exited {status}: {tail}", status=status, stderr=tail)

    def _wait(self) -> int:
        """The receiver's exit status; one that does not exit in time is killed (status -9)."""
        try:
            return self.process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class SshChannel:
    """The receiver as a command on the peer host, over one SSH session of `client`."""

    def __init__(self, client: paramiko.SSHClient, channel: paramiko.Channel, host: str) -> None:
        self.client, self.channel, self.host = client, channel, host

    def write(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
        except paramiko.SSHException as exc:
            raise ConnectionError(f"ssh to {self.host}: {exc}") from None

    def read(self, n: int) -> bytes:
        pieces, got = [], 0
        while got < n:
            piece = self.channel.recv(n - got)
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
        return b"".join(pieces)

    def close(self) -> None:
        try:
            # A connection already dead cannot take the end of stdin; its exit status says the rest.
            with contextlib.suppress(OSError, paramiko.SSHException):
                self.channel.shutdown_write()
            if not self.channel.status_event.wait(EXIT_TIMEOUT_S):
                raise ReplicationBroken(f"the receiver on {self.host} did not exit", host=self.host)
            status = self.channel.recv_exit_status()
            tail = self._stderr()
        finally:
            self.client.close()
        if status:
            raise ReplicationBroken(f"the receiver on {self.host} exited {status}: {tail}", host=self.host,
                                    status=status, stderr=tail)

    def _stderr(self) -> str:
        """What the receiver wrote to stderr; all of it has arrived once its exit status has."""
        pieces = []
        while self.channel.recv_stderr_ready():
            pieces.append(self.channel.recv_stderr(65536))
        return b"".join(pieces).decode(errors="replace")[-STDERR_TAIL:]


def local_peer(argv: list[str]) -> ProcessChannel:
    """A channel to the receiver `argv` started here."""
    return ProcessChannel(argv)


def open_peer(host: str, port: int, user: str, key_file: Path, known_hosts_file: Path, argv: list[str],
              timeout: float = 15) -> SshChannel:
    """Log in to `user@host:port` with the private key in `key_file`, trusting only the host keys in
    `known_hosts_file`, and start `argv` there (quoted for the remote shell; it must come from the
    config and validated names only). Raises PeerUnreachable naming the host when that fails."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.load_host_keys(str(known_hosts_file))
        client.connect(host, port=port, username=user, pkey=load_private_key(Path(key_file).read_text()),
                       allow_agent=False, look_for_keys=False, timeout=timeout, banner_timeout=timeout,
                       auth_timeout=timeout)
        channel = client.get_transport().open_session(timeout=timeout)
        channel.settimeout(IDLE_TIMEOUT_S)
        channel.exec_command(shlex.join(argv))
    except (paramiko.SSHException, OSError) as exc:
        client.close()
        raise PeerUnreachable(f"cannot start the receiver on {user}@{host}:{port}: {exc}", host=host) from None
    except LaxError:
        client.close()
        raise
    return SshChannel(client, channel, host)
