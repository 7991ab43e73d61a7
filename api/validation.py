"""Checking input at the edge: each check returns the clean value or raises InvalidInput naming the field."""

import re
from typing import Any

from flask import request

from config.units import parse_size
from errors import InvalidInput

NAME = re.compile(r"^[a-z0-9-]{1,63}$")
IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


def invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", field=field)


def json_body() -> dict[str, Any]:
    """The request's JSON object; an empty body counts as {}."""
    if not request.get_data():
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    return body


def reject_unknown(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(unknown[0], f"unknown field (allowed: {', '.join(sorted(allowed)) or 'none'})")


def name(value: Any, field: str) -> str:
    """A resource name: 1-63 characters of a-z, 0-9 and '-'."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise invalid(field, "must be 1-63 characters of a-z, 0-9 and '-'")
    return value


def number(value: Any, field: str, minimum: float, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value <= maximum:
        raise invalid(field, f"must be a number from {minimum:g} to {maximum:g}")
    return float(value)


def integer(value: Any, field: str, minimum: int, maximum: int) -> int:
    """An integer in [minimum, maximum]; query strings of digits count."""
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,12}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise invalid(field, f"must be an integer from {minimum} to {maximum}")
    return value


def size(value: Any, field: str, minimum: int, maximum: int) -> int:
    """A size with units ("512M", "20G") or a byte count, within [minimum, maximum] bytes."""
    try:
        parsed = parse_size(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    except ValueError:
        parsed = None
    if parsed is None or not minimum <= parsed <= maximum:
        raise invalid(field, f"must be a size like 512M or 20G, from {minimum} to {maximum} bytes")
    return parsed


def choice(value: Any, field: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise invalid(field, f"must be one of {', '.join(allowed)}")
    return value


def idempotency_key() -> str | None:
    """The request's Idempotency-Key header, if any."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise invalid("Idempotency-Key", "must be 1-100 characters of A-Z, a-z, 0-9 and . _ : -")
    return key
