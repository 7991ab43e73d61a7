"""Sizes and durations with units, as operators write them ("512M", "20G", "30d"), to exact values."""

import re
from datetime import timedelta

_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Return the byte count of `text` ("1G", "512M", "4096", 4096); ValueError if malformed.

    Units are binary (1K = 1024 bytes), the way disk and memory sizes are meant here.
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (expected e.g. 512M, 20G)")
    return int(match.group(1)) * _FACTORS[match.group(2).upper()]


_DURATION_FACTORS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhdw])\s*$", re.IGNORECASE)


def parse_duration(text: str) -> timedelta:
    """Return the length of `text` ("30d", "12h", "90m", "2w", "45s"); ValueError if malformed.

    A unit is required: a bare number could mean seconds or days, and a token living 30 s instead
    of 30 days (or the other way round) is a mistake nobody notices until it bites.
    """
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (expected e.g. 30d, 12h, 90m)")
    return timedelta(seconds=int(match.group(1)) * _DURATION_FACTORS[match.group(2).lower()])
