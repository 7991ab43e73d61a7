"""Sizes with units, as operators write them ("512M", "20G"), to exact byte counts."""

import re

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
