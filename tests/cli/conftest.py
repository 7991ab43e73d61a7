"""CLI fixtures: the API served for real by waitress on a free port, in a thread of the test process."""

import logging
import threading
from collections.abc import Iterator

import pytest
from flask import Flask
from waitress.server import create_server

from lab.processes import free_port
from tests.api.conftest import app, tokens  # noqa: F401  (the same app and tokens the API tests use)

__all__ = ["app", "tokens"]


@pytest.fixture
def api_url(app: Flask) -> Iterator[str]:  # noqa: F811
    """The URL of the API, served by waitress until the test ends."""
    port = free_port()
    server = create_server(app, host="127.0.0.1", port=port, threads=4)
    thread = threading.Thread(target=server.run, name=f"waitress-{port}", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(server)
        thread.join(10)


def _stop(server) -> None:
    # waitress has no stop(): closing every dispatcher in its map ends its loop.
    logging.getLogger("waitress").setLevel(logging.CRITICAL)
    while server._map:
        for dispatcher in list(server._map.values()):
            dispatcher.handle_close()
    server.task_dispatcher.shutdown()
