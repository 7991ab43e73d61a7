"""What every benchmark script needs: prerequisites, a clean exit on SIGTERM, a scratch directory, the results file."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from errors import LabError

RESULTS_DIR = Path(__file__).with_name("results")


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
