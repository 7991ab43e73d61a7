"""`laxcluster token create`: mint an API token straight into the inventory DB.

The one command that does not go through the API: it bootstraps the first admin token. It works
while the service runs, against the same DB (config's db_url), and migrates the schema if needed.
"""

import re
import secrets

import click
from sqlalchemy.orm import Session

import config
from models import ROLES, ApiToken
from models.db import make_engine, make_session_factory, migrate, transaction

TOKEN_PREFIX = "lax_"
NAME = re.compile(r"^[a-z0-9-]{1,63}$")


def create_token(session: Session, role: str, name: str) -> str:
    """Store a new token for `role` under `name` (hashed) and return its secret, which nothing else keeps."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, role=role, token_hash=ApiToken.digest(secret)))
    session.flush()
    return secret


@click.group("token")
def token() -> None:
    """API tokens (written to the DB directly, not through the API)."""


@token.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True, help="viewer reads, operator changes, admin does all")
@click.option("--name", help="who the token is for, as the audit trail shows it (a-z, 0-9, -); default <role>-<random>")
def create(role: str, name: str | None) -> None:
    """Create a token and print it as the last line; it is shown only this once."""
    name = name or f"{role}-{secrets.token_hex(3)}"
    if not NAME.fullmatch(name):
        raise click.BadParameter("1-63 characters of a-z, 0-9 and '-'", param_hint="--name")
    url = config.load().db_url
    migrate(url)
    engine = make_engine(url)
    try:
        with transaction(make_session_factory(engine)) as session:
            secret = create_token(session, role, name)
    finally:
        engine.dispose()
    click.echo(f"created {role} token {name!r}; store it now, it is not shown again:", err=True)
    click.echo(secret)
