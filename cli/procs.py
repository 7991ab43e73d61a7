"""Processes as /proc shows them, for the launcher: when a process started (so a recycled pid is not taken
for one of ours), which process groups still have a live member, ending whole groups at once, and children
that die with the launcher."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable, Collection
from pathlib import Path

PR_SET_PDEATHSIG = 1
KILL_WAIT_S = 3.0
POLL_S = 0.05

_libc = ctypes.CDLL(None, use_errno=True)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat from the third (state) on; None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields start after the last ')'.
    return text.rpartition(")")[2].split()


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot (field 22 of /proc/<pid>/stat); None if there is no such
    process. A pid with its start time names one process: a recycled pid starts later."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def live_groups(pgids: Collection[int]) -> set[int]:
    """Those of the process groups `pgids` that still have a running member.

    Zombies do not count: they have ended and only wait for their parent to reap them.
    """
    wanted, live = set(pgids), set()
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and fields[0] not in ("Z", "X") and int(fields[2]) in wanted:
            live.add(int(fields[2]))
    return live


def stop_groups(pgids: Collection[int], grace_s: float, hurried: Callable[[], bool] = lambda: False) -> set[int]:
    """End every process of the groups `pgids`: SIGTERM to all of them at once, one wait of at most `grace_s`
    shared by all (cut short as soon as `hurried()` is true), then SIGKILL to the groups still alive.

    Returns the groups that outlived even SIGKILL (a process stuck in the kernel), normally none.
    """
    _signal_groups(live_groups(pgids), signal.SIGTERM)
    _wait_for_groups(pgids, grace_s, hurried)
    _signal_groups(live_groups(pgids), signal.SIGKILL)
    return _wait_for_groups(pgids, KILL_WAIT_S, lambda: False)


def _wait_for_groups(pgids: Collection[int], timeout_s: float, hurried: Callable[[], bool]) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (live := live_groups(pgids)) and time.monotonic() < deadline and not hurried():
        time.sleep(POLL_S)
    return live


def _signal_groups(pgids: Collection[int], sig: signal.Signals) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass


def dying_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen: the child gets SIGTERM when the launcher dies, even by SIGKILL
    (Linux's PR_SET_PDEATHSIG), so a killed launcher takes its services down.

    Linux sends it when the *thread* that forked the child ends, not the whole process: start children from
    the main thread. A child whose parent died before prctl ran terminates itself at once.
    """
    parent = os.getpid()

    def preexec() -> None:
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec
