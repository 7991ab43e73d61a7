"""A cap on long-lived streams: job events as Server-Sent Events and VM consoles as websockets.

gunicorn's threaded worker spends one thread on each open stream for as long as it stays open, so
without a cap a handful of watchers would take every thread and even `GET /health` would wait. A
stream takes one of `[api] max_streams` slots before it starts and gives it back when its response
is closed, whatever closed it (the stream ended, the client left, it failed). With no slot free the
request is refused at once, 503 TooManyStreams with Retry-After, and the other threads stay free for
ordinary requests. The cap is per process, as the threads are.
"""

import threading
from collections.abc import Callable
from types import TracebackType

from flask import Response, current_app

from api.context import EXTENSION
from errors import TooManyStreams

# Streams end when their job does or their user leaves: a client may well find a slot a few seconds on.
RETRY_AFTER_S = 5


class Slot:
    """One claimed slot; released once however often `release` is called (on close and on error alike)."""

    def __init__(self, free: threading.BoundedSemaphore) -> None:
        self._free = free
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._free.release()

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.release()


class StreamSlots:
    """At most `size` streams open at once in this process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = threading.BoundedSemaphore(size)  # 0 switches streams off; negative is a ValueError

    def claim(self) -> Slot:
        """A free slot; TooManyStreams (503) at once if there is none, never waiting for one."""
        if not self._free.acquire(blocking=False):
            raise TooManyStreams(f"all {self.size} slots for event streams and consoles are in use; "
                                 f"try again in a few seconds", max_streams=self.size, retry_after_s=RETRY_AFTER_S)
        return Slot(self._free)


def claim() -> Slot:
    """A slot of the current app's cap (see `claim` of StreamSlots)."""
    return current_app.extensions[EXTENSION]["streams"].claim()


def streamed(make: Callable[[], Response]) -> Response:
    """The streaming response `make` builds, holding a slot until the server closes the response."""
    slot = claim()
    try:
        response = make()
    except BaseException:
        slot.release()
        raise
    # The WSGI server closes every response it was given, streamed to the end or not (a client that
    # left, a write that failed), so this runs where a generator's own `finally` might never start.
    response.call_on_close(slot.release)
    return response
