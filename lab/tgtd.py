"""A SAN's tgtd: started in the SAN's network namespace (so it listens on its storage address),
managed through its control port from the root namespace (the control socket is a file).

tgtd ignores SIGTERM; it stops once its targets and then the system are deleted over tgtadm.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from errors import CommandFailed, LabError
from lab import processes
from workers.command import run
from workers.san.tgt import Tgt

SOCKET_DIR = Path("/var/run/tgtd")
START_TIMEOUT_S = 15
STOP_TIMEOUT_S = 15


def running_pid(portal: str, control_port: int, recorded: int | None = None) -> int | None:
    """The PID of our live tgtd serving `portal` on `control_port` (`recorded` if that is it), or None."""
    tokens = (f"portal={portal}", str(control_port))
    if processes.is_ours(recorded, "tgtd", *tokens):
        return recorded
    found = processes.find("tgtd", *tokens)
    return found[0] if found else None


def start(netns: str, portal: str, control_port: int, log: Path) -> int:
    """Start tgtd in `netns` listening on `portal` ("ip:port"); return its PID once it answers.

    Only the network namespace is entered: tgtd stays in the root mount namespace, so it sees
    pool mounts made later and holds no copy of them.
    """
    argv = ["nsenter", f"--net=/run/netns/{netns}", "tgtd", "-f", "--iscsi", f"portal={portal}", "-C", str(control_port)]
    with open(log, "ab") as out:
        # Its own session: the daemon outlives the CLI that started it (and its Ctrl-C).
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    processes.wait_until(
        lambda: answers(control_port) or proc.poll() is not None, START_TIMEOUT_S, f"tgtd on control port {control_port}"
    )
    if proc.poll() is not None:
        raise LabError(f"tgtd for {portal} exited with {proc.returncode} at start; see {log}")
    return proc.pid


def answers(control_port: int) -> bool:
    """True if a tgtd answers on `control_port` and is ready."""
    proc = run(["tgtadm", "-C", str(control_port), "--op", "show", "--mode", "sys"], check=False, timeout=10)
    return proc.returncode == 0 and b"State: ready" in proc.stdout


def stop(control_port: int, pid: int | None) -> None:
    """Delete every target, then the system, so tgtd exits; SIGKILL it if it lingers. Harmless if it is not running."""
    if answers(control_port):
        try:
            Tgt(control_port).stop_daemon()
        except CommandFailed:
            pass  # e.g. a target vanished meanwhile; whatever still runs gets SIGKILL below
    if pid:
        processes.stop([pid], timeout=STOP_TIMEOUT_S)
    for leftover in (SOCKET_DIR / f"socket.{control_port}", SOCKET_DIR / f"socket.{control_port}.lock"):
        leftover.unlink(missing_ok=True)
