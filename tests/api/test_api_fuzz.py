"""Schemathesis against the served API's own /openapi.json, as admin, operator, viewer and without a token:
no request gets a 5xx, every answer matches the document, and a request that is refused (4xx) changes
nothing in the inventory."""

import hashlib
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from sqlalchemy import select

from models.base import Base

MAX_EXAMPLES = 12
# Bookkeeping a request may touch even when refused after authentication: when a token was last used.
IGNORED_COLUMNS = {("api_tokens", "last_used_at")}

@pytest.fixture
def served_schema(api_url: str, tokens: dict[str, str]):
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json", headers={"Authorization": f"Bearer {tokens['viewer']}"})


def fingerprint(rt) -> dict[str, str]:
    """A digest of every row of every inventory table."""
    digests = {}
    with rt.sessions() as session:
        for table in Base.metadata.sorted_tables:
            columns = [c for c in table.columns if (table.name, c.name) not in IGNORED_COLUMNS]
            rows = session.execute(select(*columns).order_by(*table.primary_key.columns)).all()
            digests[table.name] = hashlib.sha256(repr(rows).encode()).hexdigest()
    return digests


def callers(tokens: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {role: {"Authorization": f"Bearer {tokens[role]}"} for role in ("admin", "operator", "viewer")} | {"none": {}}


def test_no_request_breaks_the_api_or_changes_what_it_refuses(served_schema, rt, tokens):
    operations = [result.ok() for result in served_schema.get_all_operations()]
    assert len(operations) > 40
    for operation in operations:
        exercise(operation, rt, callers(tokens))


def exercise(operation, rt, headers_by_role: dict[str, dict[str, Any]]) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def each(case) -> None:
        for role, headers in headers_by_role.items():
            before = fingerprint(rt)
            response = case.call(headers=headers, timeout=30)
            where = f"{role}: {case.method} {case.formatted_path}"
            assert response.status_code < 500, f"{where} -> {response.status_code}: {response.text[:500]}"
            if 400 <= response.status_code < 500:
                assert response.headers.get("content-type") == ["application/problem+json"], (where, response.text[:300])
                changed = {t for t, digest in fingerprint(rt).items() if before[t] != digest}
                assert not changed, f"refused {where} ({response.status_code}) changed {changed}"

    each()
