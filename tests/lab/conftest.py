"""The lab as a Config: the session-wide lab of tests/conftest.py (`lab_config`), loaded."""

from pathlib import Path

import pytest

import config


@pytest.fixture(scope="session")
def lab(lab_config: Path) -> config.Config:
    """The running two-site lab (san-a, cs1, cs2 at site-a; san-b, cs3 at site-b) shared by the session."""
    return config.load(lab_config, environ={})
