"""The OpenAPI 3.1 document, built from the app's url_map and what each view says about itself.

Every view is decorated with `operation(...)`: a summary, the role it needs, its query
parameters, request body and success response. The same record drives authorization (see
api.auth), so the document and the enforced roles cannot drift apart.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify
from werkzeug.routing import Rule

ANYONE = "anyone"
SKIPPED_METHODS = frozenset({"HEAD", "OPTIONS"})
ATTRIBUTE = "lax_operation"
CONSOLE = "ui"  # the web console's blueprint: pages, not part of the API (api.ui)

blueprint = Blueprint("openapi", __name__)


@dataclass(frozen=True)
class Operation:
    summary: str
    role: str | None = None
    query: dict[str, dict[str, Any]] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    status: int = 200
    response: dict[str, Any] | None = None
    media_type: str = "application/json"


def operation(summary: str, *, role: str | None = None, query: dict[str, dict[str, Any]] | None = None,
              body: dict[str, Any] | None = None, status: int = 200, response: dict[str, Any] | None = None,
              media_type: str = "application/json") -> Callable:
    """Attach the view's description; `role` None means viewer for reads, operator for changes."""

    def attach(view: Callable) -> Callable:
        setattr(view, ATTRIBUTE, Operation(summary, role, query or {}, body, status, response, media_type))
        return view

    return attach


def described(view: Callable) -> Operation | None:
    return getattr(view, ATTRIBUTE, None)


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def required_role(op: Operation | None, method: str) -> str:
    """The role a request needs: the view's own, else viewer to read and operator to change."""
    if op is not None and op.role is not None:
        return op.role
    return "viewer" if method in ("GET", "HEAD", "OPTIONS") else "operator"


@blueprint.get("/openapi.json")
@operation("This document: every route of the API", response={"type": "object"})
def openapi_json():
    return jsonify(document(current_app))


def document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 description of every url rule of `app`."""
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint.startswith(f"{CONSOLE}."):
            continue
        view = app.view_functions[rule.endpoint]
        for method in sorted((rule.methods or set()) - SKIPPED_METHODS):
            paths.setdefault(openapi_path(rule), {})[method.lower()] = _operation(rule, method, described(view))
    return {
        "openapi": "3.1.0",
        "info": {"title": "LaxCluster API", "version": "1",
                 "description": "Virtualization cluster manager: every change is a job you can watch and cancel."},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": SCHEMAS},
    }


def openapi_path(rule: Rule) -> str:
    """`/jobs/<id>` as OpenAPI writes it: `/jobs/{id}`."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)


def _operation(rule: Rule, method: str, op: Operation | None) -> dict[str, Any]:
    op = op or Operation(summary=rule.endpoint)
    role = required_role(op, method)
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in sorted(rule.arguments)]
    parameters += [{"name": name, "in": "query", "required": False, "schema": schema} for name, schema in op.query.items()]
    result: dict[str, Any] = {
        "operationId": rule.endpoint.replace(".", "_") + ("" if method == "GET" else f"_{method.lower()}"),
        "summary": op.summary,
        "tags": [rule.endpoint.split(".")[0]],
        "parameters": parameters,
        "responses": _responses(op, role),
    }
    if role == ANYONE:
        result["security"] = []
    else:
        result["security"] = [{"bearer": []}]
        result["x-required-role"] = role
    if op.body is not None:
        result["requestBody"] = {"required": False, "content": {"application/json": {"schema": op.body}}}
    return result


def _responses(op: Operation, role: str) -> dict[str, Any]:
    problem = {"description": "a problem", "content": {"application/problem+json": {"schema": ref("Problem")}}}
    responses: dict[str, Any] = {
        str(op.status): {"description": "success", "content": {op.media_type: {"schema": op.response or {}}}},
        "default": problem,
    }
    if op.status == 202:
        responses["200"] = {"description": "the job an earlier request with the same Idempotency-Key made",
                            "content": {"application/json": {"schema": ref("Job")}}}
    if role != ANYONE:
        responses["401"] = {**problem, "description": "no valid bearer token (code Unauthorized)"}
        responses["403"] = {**problem, "description": f"needs role {role} (code Forbidden)"}
    return responses


_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
_NULLABLE_STRING = {"type": ["string", "null"]}
_TIME = {"type": ["string", "null"], "format": "date-time"}

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
            "detail": {"type": "string"}, "code": {"type": "string", "description": "stable, for clients to match on"},
            "field": {"type": "string", "description": "the invalid input (InvalidInput)"},
            "job_id": {"type": "string", "description": "the job holding the target (TargetBusy)"},
        },
    },
    "Job": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"}, "kind": {"type": "string"}, "target": {"type": "string"},
            "params": {"type": "object"}, "queue": {"type": "string"},
            "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "progress": {"type": "number", "minimum": 0, "maximum": 100}, "phase": {"type": "string"},
            "bytes_done": _NULLABLE_INT, "bytes_total": _NULLABLE_INT, "rate_bps": _NULLABLE_NUMBER,
            "result": {"type": "object"},
            "error": {"type": ["object", "null"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
            "requested_by": {"type": "string"}, "parent_id": _NULLABLE_STRING, "cancel_requested": {"type": "boolean"},
            "attempt": {"type": "integer"},
            "celery_task_id": {"type": "string", "description": "the Celery task (Flower's /task/<id>) of the current attempt"},
            "created_at": _TIME, "started_at": _TIME, "finished_at": _TIME, "updated_at": _TIME,
        },
    },
    "Server": {
        "type": "object",
        "properties": {
            "name": {"type": "string"}, "cluster": {"type": "string"}, "site": {"type": "string"},
            "libvirt_uri": {"type": "string"}, "initiator_iqn": {"type": "string"},
            "memory_limit_bytes": _NULLABLE_INT, "maintenance": {"type": "boolean"}, "reachable": {"type": ["boolean", "null"]},
            "fenced_at": {**_TIME, "description": "when the server was fenced off at its SAN; null unless fenced"},
            "cpu_count": _NULLABLE_INT, "cpu_model": _NULLABLE_STRING, "cpu_mhz": _NULLABLE_INT,
            "memory_total_bytes": _NULLABLE_INT, "memory_free_bytes": _NULLABLE_INT,
            "hypervisor_type": _NULLABLE_STRING, "hypervisor_version": _NULLABLE_STRING, "hostname": _NULLABLE_STRING,
            "hypervisor": {"type": ["string", "null"], "enum": ["kvm", "qemu", "xen", None],
                           "description": "the kind a VM's domain type follows; null until configured or probed"},
            "hypervisor_evidence": {**_NULLABLE_STRING, "description": "set in the configuration, or what the probe saw"},
            "facts_updated_at": _TIME,
        },
    },
    "Drift": {
        "type": "object",
        "properties": {
            "kind": {"enum": ["orphan", "missing", "mismatched", "unreachable"]},
            "resource": {"enum": ["volume", "snapshot", "target", "lun", "acl", "domain", "lease", "vm", "san", "server"]},
            "where": {"type": "string", "description": "the SAN or server, or inventory"},
            "what": {"type": "string", "description": "volume or snapshot handle, iqn, domain UUID or lease id"},
            "detail": {"type": "string"}, "repair": {"type": "string", "description": "the command that fixes it"},
            "safe": {"type": "boolean", "description": "laxcluster check --repair fixes it"},
            "action": _NULLABLE_STRING,
        },
    },
    "CheckReport": {
        "type": "object",
        "properties": {
            "job": ref("Job"), "clean": {"type": "boolean", "description": "no drift is left unrepaired"},
            "drifts": {"type": "array", "items": ref("Drift")}, "repaired": {"type": "array", "items": ref("Drift")},
            "repair_failed": {"type": "array", "items": ref("Drift")},
            "busy": {"type": "array", "items": {"type": "string"}, "description": "skipped: a job works on it"},
            "inspected": {"type": "object"},
        },
    },
    "Site": {"type": "object", "properties": {"name": {"type": "string"}, "clusters": {"type": "array"}, "sans": {"type": "array"}}},
    "Cluster": {"type": "object", "properties": {"name": {"type": "string"}, "site": {"type": "string"}, "servers": {"type": "array"}}},
    "San": {"type": "object", "properties": {"name": {"type": "string"}, "site": {"type": "string"}, "backend": {"type": "string"},
                                             "portal": {"type": "string"}, "pool_path": {"type": "string"}, "facts": {"type": "object"}}},
}


def list_of(name: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"items": {"type": "array", "items": ref(name)}}}
