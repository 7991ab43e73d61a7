"""`laxcluster token create --expires`, `token list` and `token revoke` against the API served for real (waitress)."""

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from cli.main import cli
from models import ApiToken, AuditEvent, utcnow

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_a_token_created_with_an_expiry_is_listed_without_its_secret_and_revoked_by_id(rt, lax_env, api_url, tokens):
    created = run("token", "create", "--role", "viewer", "--name", "nightly", "--expires", "12h", env=lax_env)
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[-1]
    with rt.sessions() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == "nightly"))
        audited = session.scalar(select(AuditEvent).where(AuditEvent.target == f"token/{row.id}"))
    assert timedelta(hours=12) - timedelta(minutes=1) < row.expires_at - utcnow() <= timedelta(hours=12)
    assert f"token {row.id} " in created.stderr and "expires" in created.stderr
    assert audited.action == "token.create" and audited.actor.startswith("local:")

    admin = ("--url", api_url, "--token", tokens["admin"])
    table = run(*admin, "token", "list")
    assert table.exit_code == 0, table.output
    line = next(line for line in table.stdout.splitlines() if " nightly " in line)
    assert f" {row.id} " in line and secret[:8] in line and "active" in line and secret not in table.stdout

    revoked = run(*admin, "token", "revoke", str(row.id), "--json")
    assert revoked.exit_code == 0, revoked.output
    assert json.loads(revoked.stdout)["state"] == "revoked"
    refused = run("--url", api_url, "--token", secret, "jobs", "list")
    assert refused.exit_code == 1 and refused.stderr.startswith("TokenRevoked: ")


def test_a_lifetime_needs_a_unit_and_a_bad_one_creates_nothing(rt, lax_env):
    for lifetime in ("30", "0d", "4000d", "soon"):
        result = run("token", "create", "--role", "viewer", "--name", "never-made", "--expires", lifetime, env=lax_env)
        assert result.exit_code == 2 and "--expires" in result.output, (lifetime, result.output)
    with rt.sessions() as session:
        assert session.scalar(select(ApiToken).where(ApiToken.name == "never-made")) is None


def test_revoking_an_unknown_token_is_an_error(api_url, tokens):
    result = run("--url", api_url, "--token", tokens["admin"], "token", "revoke", "999999")
    assert result.exit_code == 1 and result.stderr.startswith("TokenNotFound: ")
