"""`GET /health`: can this API reach its DB and Redis? No token needed, so probes can call it."""

from flask import Blueprint, jsonify
from sqlalchemy import text

from api import context
from api.openapi import ANYONE, operation

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
@operation("Whether the API reaches its DB and Redis (200) or not (503)", role=ANYONE, response={
    "type": "object", "properties": {"status": {"enum": ["ok", "degraded"]}, "checks": {"type": "object"}}})
def health():
    checks = {"db": _check(_db_answers), "redis": _check(_redis_answers)}
    healthy = all(value == "ok" for value in checks.values())
    return jsonify(status="ok" if healthy else "degraded", checks=checks), 200 if healthy else 503


def _db_answers() -> None:
    with context.runtime().engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _redis_answers() -> None:
    context.runtime().redis.ping()


def _check(probe) -> str:
    try:
        probe()
    except Exception as error:  # a health check reports every failure instead of raising it
        return f"error: {type(error).__name__}: {error}"
    return "ok"
