"""The registry of job kinds: what runs for a kind, and how its half-done work is undone."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.kinds import kind_of, load_workflows

if TYPE_CHECKING:
    from tasks.context import JobContext

Run = Callable[["JobContext"], dict[str, Any] | None]
Cleanup = Callable[["JobContext"], None]
# Marks the job's target as broken after a failure nothing undid; returns what is left behind.
LeftBehind = Callable[["JobContext"], str | None]


@dataclass(frozen=True)
class Workflow:
    kind: str
    run: Run
    cleanup: Cleanup | None = None
    # Steps are idempotent, so a job whose worker died is run again from the start.
    rerun_after_crash: bool = True
    left_behind: LeftBehind | None = None


WORKFLOWS: dict[str, Workflow] = {}


def workflow(kind: str, *, cleanup: Cleanup | None = None, rerun_after_crash: bool = True,
             left_behind: LeftBehind | None = None) -> Callable[[Run], Run]:
    """Register the decorated function as the workflow of job kind `kind`.

    `left_behind` runs when the job fails and nothing undid its work (its cleanup failed, or it has
    none): it puts the target into an explicit error state and says what is left."""

    def register(run: Run) -> Run:
        WORKFLOWS[kind] = Workflow(kind, run, cleanup, rerun_after_crash, left_behind)
        return run

    return register


def lookup(kind: str) -> Workflow:
    """The workflow of `kind`, importing the module its declaration names if this process has not yet."""
    if kind not in WORKFLOWS:
        load_workflows(kind_of(kind))
    return WORKFLOWS[kind]
