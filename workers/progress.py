"""How a driver's long operation reports how far it got: `on_progress(done, total)` in bytes or items."""

from collections.abc import Callable

Progress = Callable[[int, int], None]


def ignore_progress(done: int, total: int) -> None:
    """The default reporter, for callers that show no progress."""
    return None
