"""`GET /audit`: the audit trail (who did what, to what, when, from where), newest first, for admins.

A page holds at most `limit` events; `next_before` in the answer fetches the next, older page
(`?before=<id>`), so paging stays stable while new events are written.
"""

from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, jsonify, request
from sqlalchemy import Select, select

from api import context, validation
from api.ipam import items_of
from api.openapi import operation
from api.representations import iso
from config.units import parse_duration
from models import AuditEvent, utcnow

blueprint = Blueprint("audit", __name__)

MAX_LIMIT = 500
_TEXT = {"type": "string"}
EVENT_SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "at": {"type": "string", "format": "date-time"}, "actor": _TEXT, "action": _TEXT,
    "target": _TEXT, "source_ip": {"type": ["string", "null"]}, "details": {"type": "object"}}}
PAGE_SCHEMA = {"type": "object", "properties": {
    **items_of(EVENT_SCHEMA)["properties"],
    "next_before": {"type": ["integer", "null"], "description": "pass as `before` for the next, older page; null: no more"}}}


def event_json(event: AuditEvent) -> dict[str, Any]:
    return {"id": event.id, "at": iso(event.at), "actor": event.actor, "action": event.action, "target": event.target,
            "source_ip": event.source_ip, "details": event.details}


@blueprint.get("/audit")
@operation("The audit trail, newest first: every change, who made it (token name, or local:<user> for the CLI's "
           "token create), from where", role="admin", response=PAGE_SCHEMA, query={
               "actor": _TEXT, "action": {"type": "string", "description": "e.g. job.install-vm, token.revoke"},
               "target": {"type": "string", "description": "e.g. vm/web1, token/3"},
               "since": {"type": "string", "description": "an ISO 8601 time (UTC unless it has an offset) or a "
                                                          "duration back from now such as 24h, 7d"},
               "before": {"type": "integer", "minimum": 1, "description": "only events older than this id (paging)"},
               "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50}})
def index():
    limit = validation.integer(request.args.get("limit", 50), "limit", 1, MAX_LIMIT)
    query = _filtered(select(AuditEvent)).order_by(AuditEvent.id.desc()).limit(limit)
    with context.session() as db:
        events = [event_json(event) for event in db.scalars(query)]
    return jsonify(items=events, next_before=events[-1]["id"] if len(events) == limit else None)


def _filtered(query: Select) -> Select:
    for column in ("actor", "action", "target"):
        if column in request.args:
            query = query.where(getattr(AuditEvent, column) == request.args[column])
    if "since" in request.args:
        query = query.where(AuditEvent.at >= _since(request.args["since"]))
    if "before" in request.args:
        query = query.where(AuditEvent.id < validation.integer(request.args["before"], "before", 1, 2**62))
    return query


def _since(value: str) -> datetime:
    """The moment `value` names, naive UTC as stored: an ISO 8601 time, or a duration ago ("24h")."""
    try:
        return utcnow() - parse_duration(value)
    except ValueError:
        pass  # not a duration: a point in time, then
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise validation.invalid("since", "must be an ISO 8601 time or a duration such as 24h or 7d") from None
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment
