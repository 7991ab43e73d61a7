"""Sizes as operators write them at the edge: always with a unit, always within bounds."""

import re
from typing import Any

from api import validation

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40
MEMORY_BOUNDS = (64 * MIB, 64 * GIB)
DISK_BOUNDS = (64 * MIB, 2 * TIB)
VCPU_BOUNDS = (1, 64)
_WITH_UNIT = re.compile(r"^\s*\d+\s*[KMGT](?:I?B)?\s*$", re.IGNORECASE)


def size_with_unit(value: Any, field: str, bounds: tuple[int, int]) -> int:
    """Bytes of a size like "256M" or "2G" inside `bounds`; a bare number is refused, as a unit is easy to forget."""
    if not isinstance(value, str) or not _WITH_UNIT.fullmatch(value):
        raise validation.invalid(field, "must be a size with a unit (K, M, G or T), like 256M or 2G")
    return validation.size(value, field, *bounds)


def memory(value: Any, field: str = "memory") -> int:
    return size_with_unit(value, field, MEMORY_BOUNDS)


def disk(value: Any, field: str = "disk") -> int:
    return size_with_unit(value, field, DISK_BOUNDS)


def schema(bounds: tuple[int, int]) -> dict[str, Any]:
    """The OpenAPI schema of a size field with these bounds."""
    return {"type": "string", "pattern": _WITH_UNIT.pattern,
            "description": f"a size with a unit (binary: 1K = 1024), from {bounds[0]} to {bounds[1]} bytes"}
