"""What every benchmark script needs: prerequisites, a clean exit on SIGTERM, a scratch directory, the results file;
and what the lab benchmarks share: `laxcluster run`'s services, the guest's console shell, job timestamps."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import libvirt

import config
from cli.services import Service, celery_services
from errors import ConsoleTimeout, LabError
from lab.processes import wait_until
from workers.node.console import SerialConsole, start_event_loop

RESULTS_DIR = Path(__file__).with_name("results")
# What the lab's tiny guest prints (and keeps in /etc/laxcluster-boot) once it has booted.
BOOT_LINE = r"LAXCLUSTER-BOOT hostname=(\S+)"


class BenchError(Exception):
    """The stack did not come up or a job did not behave; the message says what and where to look."""


def require_root_and(script: str, tools: tuple[str, ...], why: str = "losetup, mount") -> None:
    """Exit with a message unless we are root and every command in `tools` exists."""
    if os.geteuid() != 0:
        raise SystemExit(f"{script} needs root ({why})")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"missing commands: {', '.join(missing)}")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the cleanup in `finally` runs as it does for Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write `bench/results/<name>` as JSON and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def measure_and_report(name: str, measure: Callable[[Path], dict[str, Any]],
                       report: Callable[[dict[str, Any]], None]) -> int:
    """Run `measure` in a scratch directory (deleted after, also on Ctrl-C or SIGTERM), print its `report`
    and write `results/<name>.json`; the exit status: 1 when the stack or a job failed (BenchError, or a
    lab daemon that did not come up), else 0."""
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix=f"lx-bench-{name}-") as scratch:
        try:
            results = measure(Path(scratch))
        except (BenchError, LabError) as error:
            print(f"benchmark failed: {error}", file=sys.stderr)
            return 1
    report(results)
    print(f"\nwrote {write_results(f'{name}.json', results)}")
    return 0


def run_to_end(argv: list[str]) -> None:
    """Run `argv`; on Ctrl-C or any error kill it and wait for it, so a scratch pool can be unmounted
    (subprocess.run does not wait after Ctrl-C, and a `sync` still running keeps the pool busy)."""
    proc = subprocess.Popen(argv)
    try:
        returncode = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if returncode:
        raise subprocess.CalledProcessError(returncode, argv)


def run_services(cfg: config.Config) -> list[Service]:
    """`laxcluster run`'s Celery services without Flower: a worker per queue, and beat (HA watcher, DR dispatcher)."""
    return [service for service in celery_services(cfg) if service.name != "flower"]


def moment(stamp: str) -> float:
    """A job's or point's ISO timestamp (the API's, with its Z) as seconds since the epoch."""
    return datetime.fromisoformat(stamp).timestamp()


def console_of(conn: libvirt.virConnect, vm: str) -> SerialConsole | None:
    """The domain's serial console; None until libvirt has its PTY (just after the domain started)."""
    try:
        return SerialConsole(conn.lookupByName(vm))
    except libvirt.libvirtError:
        return None


@contextmanager
def booted_console(uri: str, vm: str, timeout: float) -> Iterator[SerialConsole]:
    """The guest's serial console once its shell answers with the boot line (asked every 0.5 s, so a boot is seen
    within half a second), open until the block ends."""
    start_event_loop()
    conn = libvirt.open(uri)
    try:
        with wait_until(lambda: console_of(conn, vm), 30, f"{vm}'s console on {uri}") as console:
            def booted() -> bool:
                console.write(b"cat /etc/laxcluster-boot\n")
                try:
                    return bool(console.read_until(BOOT_LINE, timeout=0.5))
                except ConsoleTimeout:
                    return False

            wait_until(booted, timeout, f"{vm}'s console shell on {uri}", interval=0)
            yield console
    finally:
        conn.close()
