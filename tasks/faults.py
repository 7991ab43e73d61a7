"""Fault injection for the fault suite: a worker started with LAXCLUSTER_FAULT_KILL_AT=<kind>/<phase>
kills itself with SIGKILL (its whole process group: the Celery main process and its pool) when a job of
that kind enters that phase, as a crashed machine would. Unset, it costs one dictionary lookup.
"""

import os
import signal

KILL_AT = "LAXCLUSTER_FAULT_KILL_AT"


def kill_here_if_asked(kind: str, phase: str) -> None:
    if os.environ.get(KILL_AT) == f"{kind}/{phase}":
        os.killpg(os.getpgid(0), signal.SIGKILL)
