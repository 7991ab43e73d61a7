"""Running host commands: always an argument list, never a shell."""

import subprocess
from collections.abc import Sequence

from errors import CommandFailed


def run(argv: Sequence[str], *, check: bool = True, input: bytes | None = None, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` and return the finished process; raise CommandFailed (with stderr) if it fails and `check`."""
    proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(
            f"{argv[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}",
            argv=list(argv),
            returncode=proc.returncode,
        )
    return proc


def output(argv: Sequence[str], *, timeout: float = 600) -> str:
    """Run `argv` and return its stdout as text; raise CommandFailed if it fails."""
    return run(argv, timeout=timeout).stdout.decode()
