"""The lab fixtures of the VM tests, for the backup lab test."""

from tests.vms.conftest import api, cluster, tiny  # noqa: F401
