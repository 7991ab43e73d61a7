"""Fixtures for the SAN worker: real filesystems on loop devices, cleaned up even on failure (tgtd: tests/conftest.py)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.san import mounted_filesystem


@pytest.fixture(params=["xfs", "btrfs", "ext4"])
def pool_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A pool directory on a fresh XFS (reflink=1), btrfs, or ext4 (no reflink: the fallback)."""
    yield from mounted_filesystem(request.param, tmp_path)


@pytest.fixture
def xfs_dir(tmp_path: Path) -> Iterator[Path]:
    yield from mounted_filesystem("xfs", tmp_path)


@pytest.fixture
def ext4_dir(tmp_path: Path) -> Iterator[Path]:
    yield from mounted_filesystem("ext4", tmp_path)


