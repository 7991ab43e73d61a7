"""What a `laxcluster run` runs, kept under <var_dir>/run/: a lock the launcher holds for its whole life (one
launcher per var_dir), and a record of the services it started and whether it brought the lab up, so that
the next start can stop what a launcher that died left behind."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cli.procs import live_groups, start_time
from errors import LauncherRunning

RUN_DIR = "run"
LOCK_FILE = "launcher.lock"
RECORD_FILE = "launcher.json"


@dataclass(frozen=True)
class RecordedProcess:
    name: str
    pid: int
    # /proc start time: with the pid it tells our process from a stranger that got the pid later.
    started: int
    argv: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, name: str, pid: int, argv: list[str]) -> RecordedProcess:
        return cls(name, pid, start_time(pid) or 0, argv)

    def group_is_ours(self) -> bool:
        """Whether the process group this service leads (it started a session of its own) is still ours.

        Either its leader is still the process we started, or the pid is free: then a live group of that id
        can only be what is left of ours (the kernel does not reuse a pid while a group bears it).
        """
        return start_time(self.pid) in (None, self.started)


@dataclass
class RunRecord:
    path: Path
    launcher: RecordedProcess
    services: list[RecordedProcess] = field(default_factory=list)
    lab: bool = False

    @classmethod
    def begin(cls, run_dir: Path) -> RunRecord:
        """The record of this launcher, written at once."""
        record = cls(run_dir / RECORD_FILE, RecordedProcess.of("launcher", os.getpid(), sys.argv))
        record.save()
        return record

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord | None:
        path = run_dir / RECORD_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(path, RecordedProcess(**raw["launcher"]), [RecordedProcess(**s) for s in raw["services"]], raw["lab"])

    def add(self, name: str, pid: int, argv: list[str]) -> None:
        self.services.append(RecordedProcess.of(name, pid, argv))
        self.save()

    def mark_lab_up(self) -> None:
        """Noted before the lab comes up: a launcher dying half-way through leaves a half-made lab too."""
        self.lab = True
        self.save()

    def leftovers(self) -> list[RecordedProcess]:
        """The recorded services of which something still runs."""
        live = live_groups([service.pid for service in self.services])
        return [service for service in self.services if service.pid in live and service.group_is_ours()]

    def save(self) -> None:
        # A reader (the next start) sees the old record or the new one, never half of one. Mode 0600:
        # argument lists may hold a secret (Flower's basic-auth password).
        partial = self.path.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        partial.touch(mode=0o600)
        partial.write_text(json.dumps({"launcher": asdict(self.launcher), "services": [asdict(s) for s in self.services],
                                       "lab": self.lab}, indent=2))
        partial.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@contextmanager
def launcher_lock(run_dir: Path) -> Iterator[None]:
    """Hold <run_dir>/launcher.lock while the block runs; LauncherRunning if another launcher holds it.

    The lock is an flock: the kernel drops it when the launcher dies however it dies, and the services
    never hold it (Popen closes every other descriptor in them).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise LauncherRunning(f"laxcluster run is already running (pid {holder})", pid=holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
