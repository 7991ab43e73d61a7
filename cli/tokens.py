"""`laxcluster token create|list|revoke`: API tokens.

`create` mints a token straight into the inventory DB: it bootstraps the first admin token, so it
cannot need one. It works while the service runs, against the same DB (config's db_url), and
migrates the schema if needed. `list` and `revoke` are ordinary API commands (an admin token).
"""

import getpass
import re
import secrets
from datetime import timedelta

import click
from sqlalchemy.orm import Session

import config
from cli.client import api
from cli.output import json_option, print_item, print_rows
from config.units import parse_duration
from errors import InvalidInput
from models import ROLES, AuditEvent
from models.db import make_engine, make_session_factory, migrate, transaction
from tasks.inventory.tokens import Issued, issue

NAME = re.compile(r"^[a-z0-9-]{1,63}$")
COLUMNS = (
    ("id", lambda t: t["id"]),
    ("prefix", lambda t: t["prefix"] and t["prefix"] + "…"),
    ("name", lambda t: t["name"]),
    ("role", lambda t: t["role"]),
    ("state", lambda t: t["state"]),
    ("created", lambda t: t["created_at"]),
    ("expires", lambda t: t["expires_at"] or "never"),
    ("last used", lambda t: t["last_used_at"]),
    ("revoked", lambda t: t["revoked_at"]),
)


def create_token(session: Session, role: str, name: str, lifetime: timedelta | None = None) -> str:
    """Store a new token for `role` under `name` (hashed) and return its secret, which nothing else keeps."""
    return issue(session, role, name, lifetime).secret


@click.group("token")
def token() -> None:
    """API tokens: create (straight into the DB), list and revoke (through the API, as admin)."""


@token.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True, help="viewer reads, operator changes, admin does all")
@click.option("--name", help="who the token is for, as the audit trail shows it (a-z, 0-9, -); default <role>-<random>")
@click.option("--expires", "lifetime", metavar="DURATION",
              help="the token stops working after this long, e.g. 30d, 12h, 90m, 2w (default: never)")
def create(role: str, name: str | None, lifetime: str | None) -> None:
    """Create a token and print it as the last line; it is shown only this once."""
    name = name or f"{role}-{secrets.token_hex(3)}"
    if not NAME.fullmatch(name):
        raise click.BadParameter("1-63 characters of a-z, 0-9 and '-'", param_hint="--name")
    issued = _issue_locally(role, name, lifetime)
    token = issued.token
    until = f", expires {token.expires_at.isoformat(timespec='seconds')}Z" if token.expires_at else ""
    click.echo(f"created {role} token {token.id} ({name!r}{until}); store it now, it is not shown again:", err=True)
    click.echo(issued.secret)


@token.command("list")
@json_option
def list_tokens(as_json: bool) -> None:
    """List tokens, newest first: id, prefix, role, state, dates; never a secret."""
    print_rows(api().get("/tokens")["items"], COLUMNS, as_json)


@token.command("revoke")
@click.argument("token_id", type=click.IntRange(min=1), metavar="ID")
@json_option
def revoke(token_id: int, as_json: bool) -> None:
    """Revoke token ID (see `token list`): it is refused from the next request on."""
    print_item(api().request("DELETE", f"/tokens/{token_id}").json(), as_json)


def _issue_locally(role: str, name: str, lifetime: str | None) -> Issued:
    """A token issued in the configured DB (migrated first), audited as the local user who made it."""
    duration = _lifetime(lifetime) if lifetime else None
    url = config.load().db_url
    migrate(url)
    engine = make_engine(url)
    try:
        with transaction(make_session_factory(engine)) as session:
            issued = issue(session, role, name, duration)
            # Made outside the API, so the audit event names the local user instead of a token.
            session.add(AuditEvent(actor=f"local:{_local_user()}", action="token.create", target=f"token/{issued.token.id}",
                                   details={"name": name, "role": role, "expires": lifetime}))
            return issued
    except InvalidInput as error:  # role is a click.Choice, so only the lifetime can be out of bounds here
        raise click.BadParameter(error.message, param_hint="--expires") from None
    finally:
        engine.dispose()


def _lifetime(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--expires") from None


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"  # a container user without a passwd entry: still audited, just unnamed
