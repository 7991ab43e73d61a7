"""The HTTP face of API tokens (admins only): list them, issue one, revoke one. A secret is shown once,
in the answer that issues it; listings show only a token's id and its first characters."""

import secrets
from datetime import timedelta
from typing import Any

from flask import Blueprint, jsonify
from sqlalchemy import select

from api import context, validation
from api.changes import audit
from api.ipam import items_of
from api.openapi import operation
from api.representations import iso
from config.units import parse_duration
from models import ROLES, ApiToken, utcnow
from tasks.inventory import tokens

blueprint = Blueprint("tokens", __name__)

_TIME = {"type": ["string", "null"], "format": "date-time"}
TOKEN_SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "prefix": {"type": ["string", "null"], "description": "the secret's first characters"},
    "name": {"type": "string"}, "role": {"enum": list(ROLES)}, "state": {"enum": ["active", "expired", "revoked"]},
    "created_at": _TIME, "expires_at": _TIME, "last_used_at": _TIME, "revoked_at": _TIME}}
ISSUED_SCHEMA = {"type": "object", "properties": {
    **TOKEN_SCHEMA["properties"], "secret": {"type": "string", "description": "the bearer token; shown only this once"}}}
CREATE_BODY = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": list(ROLES)},
    "name": {"type": "string", "pattern": validation.NAME.pattern, "description": "who it is for; default <role>-<random>"},
    "expires": {"type": "string", "description": "lifetime such as 30d, 12h, 90m, 2w; default: never expires"}}}


def token_json(token: ApiToken) -> dict[str, Any]:
    return {"id": token.id, "prefix": token.prefix, "name": token.name, "role": token.role,
            "state": token.state(utcnow()), "created_at": iso(token.created_at), "expires_at": iso(token.expires_at),
            "last_used_at": iso(token.last_used_at), "revoked_at": iso(token.revoked_at)}


@blueprint.get("/tokens")
@operation("List API tokens, newest first: id, prefix, role, state and dates, never a secret",
           role="admin", response=items_of(TOKEN_SCHEMA))
def index():
    with context.session() as db:
        rows = db.scalars(select(ApiToken).order_by(ApiToken.id.desc()))
        return jsonify(items=[token_json(token) for token in rows])


@blueprint.post("/tokens")
@operation("Issue an API token; the answer carries its secret, which is not kept and never shown again "
           "(a DB change, no job)", role="admin", status=201, response=ISSUED_SCHEMA, body=CREATE_BODY)
def create():
    body = validation.json_body()
    validation.reject_unknown(body, set(CREATE_BODY["properties"]))
    role = validation.choice(body.get("role"), "role", ROLES)
    name = validation.name(body["name"], "name") if "name" in body else f"{role}-{secrets.token_hex(3)}"
    lifetime = _lifetime(body["expires"]) if "expires" in body else None
    with context.session() as db:
        issued = tokens.issue(db, role, name, lifetime)
        audit(db, "token.create", f"token/{issued.token.id}", name=name, role=role, expires=body.get("expires"))
        shown = {**token_json(issued.token), "secret": issued.secret}
    response = jsonify(shown)
    response.status_code = 201
    return response


@blueprint.delete("/tokens/<token_id>")
@operation("Revoke an API token: it is refused (TokenRevoked) from the next request on; revoking it again changes "
           "nothing", role="admin", response=TOKEN_SCHEMA)
def revoke(token_id: str):
    number = validation.integer(token_id, "token_id", 1, 2**62)
    with context.session() as db:
        token, changed = tokens.revoke(db, number)
        if changed:
            audit(db, "token.revoke", f"token/{token.id}", name=token.name, role=token.role)
        return jsonify(token_json(token))


def _lifetime(value: Any) -> timedelta:
    if not isinstance(value, str):
        raise validation.invalid("expires", "must be a duration such as 30d, 12h, 90m or 2w")
    try:
        return parse_duration(value)
    except ValueError as error:
        raise validation.invalid("expires", str(error)) from None
