"""Migration tests reuse the VM lab fixtures (the lab in the inventory, workers, `tiny` imported) and
the API fixtures (the app on the test's DB, a client, a token per role)."""

from tests.api.conftest import app, client, tokens  # noqa: F401  (fixtures)
from tests.vms.conftest import cluster, tiny  # noqa: F401  (fixtures)

__all__ = ["app", "client", "cluster", "tiny", "tokens"]
