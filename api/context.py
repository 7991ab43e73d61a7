"""What a request handler reaches through the app: the runtime (DB, Redis, config) and Celery."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from flask import current_app, request
from sqlalchemy.orm import Session

from models.db import transaction
from tasks.runtime import Runtime

EXTENSION = "laxcluster"


def runtime() -> Runtime:
    return current_app.extensions[EXTENSION]["runtime"]


def celery() -> Celery:
    return current_app.extensions[EXTENSION]["celery"]


@contextmanager
def session() -> Iterator[Session]:
    """A DB transaction for this request, committed when the block ends without error."""
    with transaction(runtime().sessions) as db:
        yield db


def routed_view() -> Callable[..., Any]:
    """The view function the current request was routed to."""
    return current_app.view_functions[request.endpoint]
