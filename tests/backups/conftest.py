"""The lab fixtures of the VM tests, for the backup lab test."""

from tests.vms.conftest import cluster, tiny  # noqa: F401
