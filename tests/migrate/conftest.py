"""Migration tests reuse the VM lab fixtures: the lab in the inventory, workers, `tiny` imported."""

from tests.vms.conftest import cluster, tiny  # noqa: F401  (fixtures)

__all__ = ["cluster", "tiny"]
