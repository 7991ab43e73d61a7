"""Errors with a stable code, raised deep and turned into problem+json once, at the API edge."""

from typing import Any


class LaxError(Exception):
    """Base of every LaxCluster error a user may see.

    `code` is stable (clients match on it); `http_status` is the status the API answers with
    when the error reaches it; `extra` holds machine-readable details (e.g. the holding job).
    """

    code = "Error"
    http_status = 500

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class NotFound(LaxError):
    code = "NotFound"
    http_status = 404


class Conflict(LaxError):
    code = "Conflict"
    http_status = 409


class InvalidInput(LaxError):
    code = "InvalidInput"
    http_status = 422


class CommandFailed(LaxError):
    """A host command exited non-zero; the message carries its stderr."""

    code = "CommandFailed"
    http_status = 502
