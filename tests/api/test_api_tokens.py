"""API tokens through the API: issue, list, revoke by id, expiry; all of it an admin's, none of it showing a secret."""

from datetime import timedelta

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import func, select, text, update

from cli.tokens import create_token
from models import ApiToken, AuditEvent, utcnow
from models.db import MIGRATIONS, transaction
from tests.fixtures.http import assert_problem, bearer


def issue(client, admin: str, **body):
    return client.post("/tokens", json=body, headers=bearer(admin))


def listed(client, admin: str) -> dict[int, dict]:
    response = client.get("/tokens", headers=bearer(admin))
    assert response.status_code == 200
    return {token["id"]: token for token in response.get_json()["items"]}


def token_audit(rt) -> list[tuple[str, str, str]]:
    with rt.sessions() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action.like("token.%")).order_by(AuditEvent.id))
        return [(e.actor, e.action, e.target) for e in rows]


def test_an_admin_issues_a_token_whose_secret_is_shown_once(rt, client, tokens):
    response = issue(client, tokens["admin"], role="viewer", name="ci-reader", expires="30d")
    assert response.status_code == 201
    made = response.get_json()
    secret = made.pop("secret")
    assert secret.startswith("lax_") and made["prefix"] == secret[:8]
    assert (made["name"], made["role"], made["state"], made["revoked_at"]) == ("ci-reader", "viewer", "active", None)
    with rt.sessions() as session:
        row = session.get(ApiToken, made["id"])
    assert row.token_hash == ApiToken.digest(secret)
    assert timedelta(days=30) - timedelta(minutes=1) < row.expires_at - utcnow() <= timedelta(days=30)
    assert client.get("/jobs", headers=bearer(secret)).status_code == 200
    listing = client.get("/tokens", headers=bearer(tokens["admin"]))
    assert secret not in listing.get_data(as_text=True) and "token_hash" not in listing.get_data(as_text=True)
    assert listing.get_json()["items"][0] == {**made, "last_used_at": listing.get_json()["items"][0]["last_used_at"]}
    assert listing.get_json()["items"][0]["last_used_at"] is not None
    assert token_audit(rt) == [("test-admin", "token.create", f"token/{made['id']}")]


def test_a_revoked_token_is_refused_at_once_and_only_that_one(rt, client, tokens):
    # Two tokens for one name: the id, not the name, says which one goes.
    first = issue(client, tokens["admin"], role="operator", name="deploy").get_json()
    second = issue(client, tokens["admin"], role="operator", name="deploy").get_json()
    assert first["id"] != second["id"]
    assert client.get("/jobs", headers=bearer(first["secret"])).status_code == 200

    revoked = client.delete(f"/tokens/{first['id']}", headers=bearer(tokens["admin"]))
    assert revoked.status_code == 200
    assert (revoked.get_json()["state"], revoked.get_json()["id"]) == ("revoked", first["id"])
    refused = assert_problem(client.get("/jobs", headers=bearer(first["secret"])), 401, "TokenRevoked")
    assert refused["token_id"] == first["id"]
    assert client.get("/jobs", headers=bearer(second["secret"])).status_code == 200
    states = {token_id: token["state"] for token_id, token in listed(client, tokens["admin"]).items()}
    assert (states[first["id"]], states[second["id"]]) == ("revoked", "active")

    again = client.delete(f"/tokens/{first['id']}", headers=bearer(tokens["admin"]))
    assert again.get_json()["revoked_at"] == revoked.get_json()["revoked_at"]
    assert [action for _, action, target in token_audit(rt) if target == f"token/{first['id']}"] == \
        ["token.create", "token.revoke"]
    assert_problem(client.delete("/tokens/999999", headers=bearer(tokens["admin"])), 404, "TokenNotFound")
    assert assert_problem(client.delete("/tokens/abc", headers=bearer(tokens["admin"])), 422, "InvalidInput")["field"] == "token_id"


def test_an_expired_token_is_refused_with_its_own_code_and_left_untouched(rt, client, tokens):
    with transaction(rt.sessions) as session:
        secret = create_token(session, "viewer", "short-lived", timedelta(hours=1))
    assert client.get("/jobs", headers=bearer(secret)).status_code == 200
    with transaction(rt.sessions) as session:
        session.execute(update(ApiToken).where(ApiToken.name == "short-lived")
                        .values(expires_at=utcnow() - timedelta(seconds=1), last_used_at=None))
    response = client.get("/jobs", headers=bearer(secret))
    assert_problem(response, 401, "TokenExpired")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    with rt.sessions() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == "short-lived"))
    assert row.last_used_at is None  # a refused request changes nothing
    assert listed(client, tokens["admin"])[row.id]["state"] == "expired"


def test_tokens_are_an_admins_and_a_refusal_changes_nothing(rt, client, tokens):
    victim = issue(client, tokens["admin"], role="viewer").get_json()
    before = _token_rows(rt)
    for role in ("viewer", "operator"):
        auth = bearer(tokens[role])
        assert_problem(client.get("/tokens", headers=auth), 403, "Forbidden")
        assert_problem(client.post("/tokens", json={"role": "admin"}, headers=auth), 403, "Forbidden")
        assert_problem(client.delete(f"/tokens/{victim['id']}", headers=auth), 403, "Forbidden")
    assert _token_rows(rt) == before
    assert client.get("/jobs", headers=bearer(victim["secret"])).status_code == 200


@pytest.mark.parametrize("body, field", [
    ({}, "role"),
    ({"role": "root"}, "role"),
    ({"role": "viewer", "name": "Bad_Name"}, "name"),
    ({"role": "viewer", "expires": "30"}, "expires"),
    ({"role": "viewer", "expires": 30}, "expires"),
    ({"role": "viewer", "expires": "0d"}, "expires"),
    ({"role": "viewer", "expires": "4000d"}, "expires"),
    ({"role": "viewer", "secret": "lax_mine"}, "secret"),
])
def test_issuing_checks_its_input_and_makes_nothing_when_refused(rt, client, tokens, body, field):
    before = _token_rows(rt)
    assert assert_problem(issue(client, tokens["admin"], **body), 422, "InvalidInput")["field"] == field
    assert _token_rows(rt) == before


def test_tokens_made_before_expiry_existed_keep_working_after_the_migration(rt, db_url, client):
    alembic = AlembicConfig()
    alembic.set_main_option("script_location", str(MIGRATIONS))
    alembic.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    rt.engine.dispose()  # no pooled connection may hold the table while its columns change
    command.downgrade(alembic, "0003")
    secret = "lax_from-before-0004"
    with rt.engine.begin() as connection:
        connection.execute(text("INSERT INTO api_tokens (name, role, token_hash, created_at, revoked) "
                                "VALUES ('old', 'admin', :digest, :now, false)"),
                           {"digest": ApiToken.digest(secret), "now": utcnow()})
    rt.engine.dispose()
    command.upgrade(alembic, "head")
    old = next(token for token in listed(client, secret).values() if token["name"] == "old")
    assert (old["state"], old["prefix"], old["expires_at"]) == ("active", None, None)


def _token_rows(rt) -> tuple[int, int]:
    """How many tokens there are, and how many of them are revoked."""
    with rt.sessions() as session:
        return (session.scalar(select(func.count()).select_from(ApiToken)),
                session.scalar(select(func.count()).select_from(ApiToken).where(ApiToken.revoked.is_(True))))
