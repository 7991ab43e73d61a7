"""Bearer-token authentication and role checks, applied to every route before its view runs.

Tokens are looked up by their SHA-256 (ApiToken.digest); a revoked or expired one is refused with
its own code (TokenRevoked, TokenExpired). Roles are ordered viewer < operator < admin. The role a
route needs comes from its `operation` record (api.openapi).
"""

from dataclasses import dataclass
from datetime import timedelta

from flask import Flask, g, request
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api import context
from api.openapi import ANYONE, CONSOLE, described, required_role
from errors import Forbidden, TokenExpired, TokenRevoked, Unauthorized
from models import ROLES, ApiToken, utcnow

TOUCH_INTERVAL = timedelta(minutes=1)


@dataclass(frozen=True)
class Caller:
    """Who is making this request, as the audit trail names them."""

    name: str
    role: str


def register(app: Flask) -> None:
    app.before_request(authorize)


def authorize() -> None:
    """Stop the request with 401/403 unless its token carries the role the route needs."""
    if request.endpoint is None:
        return  # no such route: routing answers 404/405 itself
    if request.blueprint == CONSOLE:
        return  # the web console authenticates its session itself (api.ui.signin)
    needed = required_role(described(context.routed_view()), request.method)
    if needed == ANYONE:
        return
    caller = authenticate(request.headers.get("Authorization", ""))
    if ROLES.index(caller.role) < ROLES.index(needed):
        raise Forbidden(f"this needs role {needed}; token {caller.name} has role {caller.role}", required_role=needed)
    g.caller = caller


def authenticate(header: str) -> Caller:
    """The caller a `Bearer <token>` header names; Unauthorized if it names none."""
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("send an API token as 'Authorization: Bearer <token>' (laxcluster token create)")
    digest = ApiToken.digest(secret.strip())
    with context.session() as db:
        token = db.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
        if token is None or token.role not in ROLES:
            raise Unauthorized("unknown API token")
        _refuse_unless_active(token)
        _touch(db, token)
        return Caller(name=token.name, role=token.role)


def _refuse_unless_active(token: ApiToken) -> None:
    # Read from the DB on every request, never cached: a revocation or expiry holds from the next request on.
    state = token.state(utcnow())
    if state == "revoked":
        raise TokenRevoked(f"API token {token.id} ({token.name}) was revoked; ask an admin for a new one", token_id=token.id)
    if state == "expired":
        raise TokenExpired(f"API token {token.id} ({token.name}) expired at {token.expires_at.isoformat(timespec='seconds')}Z; "
                           "ask an admin for a new one", token_id=token.id)


def current_caller() -> Caller:
    return g.caller


def _touch(db: Session, token: ApiToken) -> None:
    # At most one write a minute per token, so reads do not turn into DB writes.
    now = utcnow()
    if token.last_used_at is None or now - token.last_used_at >= TOUCH_INTERVAL:
        db.execute(update(ApiToken).where(ApiToken.id == token.id).values(last_used_at=now))
