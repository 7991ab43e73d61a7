"""Small helpers shared by the tests: waiting on conditions, free ports, missing components."""

import hashlib
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from errors import LabTimeout
from lab.processes import wait_until

T = TypeVar("T")
IN_CI = os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> None:
    """Skip for a missing real component, except under CI, where that is a failure."""
    if IN_CI:
        pytest.fail(f"required component missing under CI: {reason}")
    pytest.skip(reason)


def need_binary(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            missing(f"{name} is not installed (make setup installs it)")


def need_root() -> None:
    if os.geteuid() != 0:
        missing("needs root (namespaces, loop devices, daemons)")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `condition` until it returns something truthy; fail the test with `what` after `timeout` seconds."""
    try:
        return wait_until(condition, timeout, what, interval)
    except LabTimeout as error:
        raise AssertionError(error.message) from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_at(path: str | Path, offset: int, data: bytes) -> None:
    """Overwrite `data` at `offset` of a file and flush it to disk."""
    with open(path, "r+b") as target:
        target.seek(offset)
        target.write(data)
        os.fsync(target.fileno())
