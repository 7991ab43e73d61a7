"""The lab's daemons as PIDs: is it ours and alive, read a pidfile, stop it for sure; a free port for
one to listen on and a wait until it answers (tests and benchmarks start their daemons with these too)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from errors import LabError, LabTimeout

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `condition` until it returns something truthy and return that; raise LabTimeout after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on at this moment."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cmdline(pid: int) -> list[str]:
    """The argument list of live process `pid`; empty if it is gone or a zombie (never reaps: that is its parent's job)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return []
    if state in ("Z", "X"):
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def qemu_of(name: str) -> list[int]:
    """PIDs of the QEMU processes running guest `name` (libvirt names it with `-name guest=<name>,...`)."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [pid for pid in pids if any(arg.startswith(f"guest={name},") for arg in cmdline(pid))]


def is_ours(pid: int | None, program: str, *tokens: str) -> bool:
    """True if `pid` is alive, runs `program` and has every one of `tokens` among its arguments.

    The tokens (our own pidfile path, control port) are what makes a recycled PID of a stranger fail.
    """
    if not pid:
        return False
    argv = cmdline(pid)
    return bool(argv) and Path(argv[0]).name == program and all(token in argv for token in tokens)


def find(program: str, *tokens: str) -> list[int]:
    """PIDs of every live process for which `is_ours(pid, program, *tokens)` holds (a /proc scan)."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [pid for pid in pids if is_ours(pid, program, *tokens)]


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid: int) -> bool:
    return bool(cmdline(pid))


def stop(pids: Iterable[int], timeout: float = 10.0, first: signal.Signals = signal.SIGTERM) -> None:
    """Send `first` to every pid, SIGKILL what is left after `timeout` s, and return once all are gone."""
    pending = [pid for pid in pids if alive(pid)]
    _signal_all(pending, first)
    try:
        wait_until(lambda: not any(alive(pid) for pid in pending), timeout, f"processes {pending} to exit")
    except LabError:
        _signal_all(pending, signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in pending), 10, f"processes {pending} to die after SIGKILL")


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

