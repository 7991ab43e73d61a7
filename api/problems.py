"""The error model: every error leaves the API as application/problem+json with a stable `code`.

LaxErrors carry their own code, status and details; werkzeug's HTTP errors (404, 405, 400 …)
get a code from their name; anything else is a 500 InternalError whose detail hides internals.
"""

import json
import logging
import re
from typing import Any

import redis
from flask import Flask, Response
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from errors import InternalError, LaxError, ServiceUnavailable

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"
# Fields of the problem itself; details from an error's `extra` never overwrite them.
RESERVED = frozenset({"type", "title", "status", "detail", "code", "instance"})


def problem(status: int, code: str, detail: str, **extra: Any) -> Response:
    """A problem+json response (RFC 9457) with LaxCluster's stable `code` member."""
    body = {
        "type": f"urn:laxcluster:problem:{code}",
        "title": _title(code),
        "status": status,
        "detail": detail,
        "code": code,
        **{key: value for key, value in extra.items() if key not in RESERVED},
    }
    response = Response(json.dumps(body, default=str), status=status, mimetype=PROBLEM_JSON)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="laxcluster"'
    return response


def register(app: Flask) -> None:
    """Route every error the app can raise through `problem`."""
    app.register_error_handler(LaxError, _from_lax_error)
    app.register_error_handler(HTTPException, _from_http_exception)
    app.register_error_handler(redis.ConnectionError, _from_backend_outage)
    app.register_error_handler(OperationalError, _from_backend_outage)
    app.register_error_handler(Exception, _from_crash)


def _from_lax_error(error: LaxError) -> Response:
    status = error.http_status if 400 <= error.http_status < 600 else 500
    response = problem(status, error.code, error.message, **error.extra)
    if "retry_after_s" in error.extra:
        response.headers["Retry-After"] = str(int(error.extra["retry_after_s"]))
    return response


def _from_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    code = re.sub(r"[^A-Za-z0-9]", "", error.name) or "HTTPError"
    response = problem(status, code, error.description or error.name)
    if status == 405 and error.valid_methods:
        response.headers["Allow"] = ", ".join(error.valid_methods)
    return response


def _from_backend_outage(error: Exception) -> Response:
    log.warning("a backend is unavailable: %s", error)
    outage = ServiceUnavailable(f"the inventory DB or Redis is unavailable ({type(error).__name__}); try again shortly")
    return _from_lax_error(outage)


def _from_crash(error: Exception) -> Response:
    log.exception("unhandled error in a request")
    return problem(InternalError.http_status, InternalError.code, "the server failed to handle this request; see its log")


def _title(code: str) -> str:
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+", code)
    return " ".join(words).capitalize() if words else code
