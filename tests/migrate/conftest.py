"""Migration tests reuse the VM lab fixtures (the lab in the inventory, workers, `tiny` imported) and
the API fixtures (the app on the test's DB, a client, a token per role, the API served by waitress)."""

from tests.api.conftest import app, client, tokens  # noqa: F401  (fixtures)
from tests.cli.conftest import api_url  # noqa: F401  (fixture)
from tests.vms.conftest import cluster, tiny  # noqa: F401  (fixtures)

__all__ = ["api_url", "app", "client", "cluster", "tiny", "tokens"]
