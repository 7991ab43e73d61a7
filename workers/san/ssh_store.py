"""A chunk store on another host, reached over SSH with a key (SFTP through paramiko: no remote shell).

Same layout and the same atomic, durable writes as `LocalStore`: a temporary name, synced on
the server (OpenSSH's `fsync@openssh.com`), an OpenSSH posix-rename, then the directory synced,
so a reader on either side never sees half a pack, index or manifest and a crash of the store
host never leaves a torn file under its final name. The server's host key must be given (a
known_hosts line): an unknown host is refused.

Each thread gets its own SFTP channel over one SSH connection, so the backup pool's threads
upload in parallel.
"""

import errno
import io
import posixpath
import stat
import threading
from collections.abc import Sequence
from typing import Any

import paramiko
from paramiko.sftp import CMD_EXTENDED

from errors import InvalidInput, InvalidStoreLocation, StoreUnreachable
from workers.san.chunks import STORE_DIRECTORIES, ChunkStore, temp_name

CONNECT_TIMEOUT_S = 15
KEY_CLASSES = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


def parse_location(location: str) -> tuple[str, str, str]:
    """(user, host, path) of `user@host:/absolute/path`."""
    account, sep, path = location.partition(":")
    user, at, host = account.rpartition("@")
    if not sep or not at or not user or not host or not path.startswith("/"):
        raise InvalidStoreLocation(f"ssh store location {location!r} is not user@host:/absolute/path",
                                   location=location)
    return user, host, path


def load_private_key(text: str) -> paramiko.PKey:
    """The private key in OpenSSH or PEM text (ed25519, ECDSA or RSA)."""
    for kind in KEY_CLASSES:
        try:
            return kind.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    raise InvalidInput("the ssh store's private key is not an unencrypted ed25519, ECDSA or RSA key",
                       field="private_key")


def is_missing(exc: OSError) -> bool:
    return isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT


class SshStore(ChunkStore):
    """A store in directory `path` on `host`, logged in to as `user` with `private_key`.

    `host_key` is the server's public key as a known_hosts line (`host type base64`); `port` 22 by default.
    """

    def __init__(self, host: str, path: str, *, user: str, private_key: str, host_key: str, port: int = 22) -> None:
        super().__init__()
        self.host, self.port, self.path = host, port, path
        self.location = f"{host}:{path}"
        self.client = paramiko.SSHClient()
        self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        self._trust(host_key)
        try:
            self.client.connect(host, port=port, username=user, pkey=load_private_key(private_key),
                                allow_agent=False, look_for_keys=False, timeout=CONNECT_TIMEOUT_S)
        except (paramiko.SSHException, OSError) as exc:
            raise StoreUnreachable(f"cannot log in to {user}@{host}:{port}: {exc}", host=host) from None
        self.local = threading.local()
        self._makedirs(self.path)
        for sub in STORE_DIRECTORIES:
            self._makedirs(posixpath.join(self.path, sub))

    @classmethod
    def from_row(cls, location: str, credentials: dict[str, Any]) -> "SshStore":
        """The store a BackupStore row of kind `ssh` describes (credentials: private_key, host_key, port)."""
        user, host, path = parse_location(location)
        missing = [key for key in ("private_key", "host_key") if not credentials.get(key)]
        if missing:
            raise InvalidInput(f"ssh store {location} needs credentials {', '.join(missing)}", missing=missing)
        return cls(host, path, user=user, private_key=credentials["private_key"], host_key=credentials["host_key"],
                   port=int(credentials.get("port") or 22))

    def _trust(self, known_hosts_line: str) -> None:
        entry = paramiko.hostkeys.HostKeyEntry.from_line(known_hosts_line.strip())
        if entry is None or entry.key is None:
            raise InvalidInput("host_key must be a known_hosts line: host keytype base64", field="host_key")
        names = {self.host, f"[{self.host}]:{self.port}"}
        for name in names:
            self.client.get_host_keys().add(name, entry.key.get_name(), entry.key)

    # -- the file operations ChunkStore builds its interface on ---------------------------------

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if not hasattr(self.local, "sftp"):
            self.local.sftp = self.client.open_sftp()
        return self.local.sftp

    def _abs(self, relpath: str) -> str:
        return posixpath.join(self.path, relpath)

    def _makedirs(self, path: str) -> None:
        try:
            if stat.S_ISDIR(self.sftp.stat(path).st_mode):
                return
        except OSError as exc:
            if not is_missing(exc):
                raise
        parent = posixpath.dirname(path)
        if parent != path:
            self._makedirs(parent)
        try:
            self.sftp.mkdir(path)
        except OSError:
            if not stat.S_ISDIR(self.sftp.stat(path).st_mode):
                raise
            return
        self._sync_remote_directory(parent)

    def _sync(self, remote: paramiko.SFTPFile) -> None:
        """Wait for the status of every pipelined write (paramiko would drop them at close, errors too),
        then fsync the file on the server. paramiko has no call for OpenSSH's fsync extension, so it
        is sent the way paramiko sends posix-rename@openssh.com."""
        remote.flush()
        while remote._reqs:
            self.sftp._read_response(remote._reqs.popleft())
        self.sftp._request(CMD_EXTENDED, "fsync@openssh.com", remote.handle)

    def _sync_remote_directory(self, path: str) -> None:
        """Make a rename or a new entry in directory `path` durable on the server (the server opens
        the directory read-only, which Linux allows, and fsyncs that handle)."""
        with self.sftp.open(path, "r") as directory:
            self._sync(directory)

    def _sync_directory(self, relpath: str) -> None:
        self._sync_remote_directory(self._abs(relpath))

    def _size(self, relpath: str) -> int | None:
        try:
            return self.sftp.stat(self._abs(relpath)).st_size
        except OSError as exc:
            if is_missing(exc):
                return None
            raise

    def _read(self, relpath: str) -> bytes | None:
        try:
            with self.sftp.open(self._abs(relpath), "rb") as source:
                source.prefetch()
                return source.read()
        except OSError as exc:
            if is_missing(exc):
                return None
            raise

    def _sizes(self, relpath: str) -> dict[str, int]:
        try:
            entries = self.sftp.listdir_attr(self._abs(relpath))
        except OSError as exc:
            if is_missing(exc):
                return {}
            raise
        return {entry.filename: entry.st_size for entry in entries if stat.S_ISREG(entry.st_mode or 0)}

    def _read_range(self, relpath: str, offset: int, length: int) -> bytes | None:
        try:
            with self.sftp.open(self._abs(relpath), "rb") as source:
                source.seek(offset)
                return source.read(length)
        except OSError as exc:
            if is_missing(exc):
                return None
            raise

    def _write_atomically(self, relpath: str, parts: Sequence[bytes], *, sync_directory: bool = True) -> None:
        final = self._abs(relpath)
        directory = posixpath.dirname(final)
        self._makedirs(directory)
        temp = temp_name(final)
        try:
            with self.sftp.open(temp, "wb") as out:
                out.set_pipelined(True)
                out.writelines(parts)
                self._sync(out)
            self.sftp.posix_rename(temp, final)
            if sync_directory:
                self._sync_remote_directory(directory)
        except BaseException:
            self._remove_path(temp)
            raise

    def _remove(self, relpath: str) -> None:
        self._remove_path(self._abs(relpath))

    def _remove_path(self, path: str) -> None:
        try:
            self.sftp.remove(path)
        except OSError as exc:
            if not is_missing(exc):
                raise

    def _remove_directory(self, relpath: str) -> None:
        try:
            self.sftp.rmdir(self._abs(relpath))
        except OSError as exc:
            if not is_missing(exc):
                raise

    def _listdir(self, relpath: str) -> list[str]:
        try:
            return self.sftp.listdir(self._abs(relpath))
        except OSError as exc:
            if is_missing(exc):
                return []
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.client.close()
