"""The HTTP face of storage: SANs with their pool facts, their volumes, templates, and volume resize."""

import os
import re
from pathlib import PurePosixPath
from typing import Any

from flask import Blueprint, jsonify, request
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from api import context, sizes, validation
from api.changes import submit_job
from api.ipam import items_of
from api.openapi import operation, ref
from api.representations import iso, san_json
from errors import ImportSourceRefused, LaxError, SanNotFound, TemplateExists, UnknownSan, VolumeNotFound
from models import San, Template, VirtualMachine, Volume

sans = Blueprint("sans", __name__)
templates = Blueprint("templates", __name__)
volumes = Blueprint("volumes", __name__)

OS_NAME = re.compile(r"^[a-z0-9._-]{1,63}$")
IMAGE_FORMATS = ("raw", "qcow2")
MAX_PATH = 1023
_INT = {"type": ["integer", "null"]}
_TEXT = {"type": "string"}


SAN_SCHEMA = {"type": "object", "properties": {
    "name": _TEXT, "site": _TEXT, "backend": _TEXT, "portal": _TEXT, "pool_path": _TEXT,
    "pool_size_bytes": _INT, "pool_free_bytes": _INT, "pool_used_bytes": _INT, "reflink": {"type": ["boolean", "null"]},
    "facts": {"type": "object", "description": "everything the SAN's last refresh reported"}}}
VOLUME_SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": _TEXT, "san": _TEXT, "site": _TEXT, "vm": {"type": ["string", "null"]},
    "role": {"enum": ["disk", "seed", "data", "restoring"]}, "label": _TEXT, "size_bytes": {"type": "integer"}, "backend_handle": _TEXT,
    "iscsi_target": {"type": ["string", "null"]}, "iscsi_lun": _INT, "created_at": _TEXT}}
TEMPLATE_SCHEMA = {"type": "object", "properties": {
    "name": _TEXT, "san": {"type": ["string", "null"]}, "site": {"type": ["string", "null"]}, "os": _TEXT,
    "default_size_bytes": {"type": "integer"}, "customization": _TEXT, "direct_boot": {"type": "boolean"},
    "boot": {"type": "object"}, "created_at": _TEXT}}


def san_facts_json(san: San) -> dict[str, Any]:
    """A SAN as configured, with its pool's size, free and used bytes and reflink support from its last refresh."""
    facts = san.facts or {}
    total, free = facts.get("total_bytes"), facts.get("free_bytes")
    return {**san_json(san), "pool_size_bytes": total, "pool_free_bytes": free,
            "pool_used_bytes": total - free if total is not None and free is not None else None,
            "reflink": facts.get("reflink")}


def volume_json(volume: Volume, san: San, vm: str | None) -> dict[str, Any]:
    return {"id": volume.id, "name": volume.name, "san": san.name, "site": san.site.name,
            "vm": vm, "role": volume.role, "label": volume.label, "size_bytes": volume.size_bytes, "backend_handle": volume.backend_handle,
            "iscsi_target": volume.iscsi_target, "iscsi_lun": volume.iscsi_lun, "created_at": iso(volume.created_at)}


def template_json(template: Template, san: San | None) -> dict[str, Any]:
    return {"name": template.name, "san": san and san.name, "site": san and san.site.name, "os": template.os,
            "default_size_bytes": template.default_size_bytes, "customization": template.customization,
            "direct_boot": bool(template.boot), "boot": template.boot, "created_at": iso(template.created_at)}


# -- SANs ---------------------------------------------------------------------

@sans.get("/sans")
@operation("List SANs: backend, iSCSI portal, site, pool size/free/used bytes and reflink support",
           response=items_of(SAN_SCHEMA))
def san_index():
    with context.session() as db:
        rows = db.scalars(select(San).options(joinedload(San.site)).order_by(San.name))
        return jsonify(items=[san_facts_json(san) for san in rows])


@sans.get("/sans/<name>/volumes")
@operation("List the volumes on one SAN", response=items_of(VOLUME_SCHEMA))
def san_volumes(name: str):
    with context.session() as db:
        san = find_san(db, name, "name", missing=SanNotFound)
        query = volumes_query().where(Volume.san_id == san.id).order_by(Volume.name)
        return jsonify(items=[volume_json(*row) for row in db.execute(query)])


@sans.post("/sans/<name>/refresh")
@operation("Refresh a SAN's facts (pool size and free space, reflink support) on its site's SAN queue",
           status=202, response=ref("Job"))
def san_refresh(name: str):
    validation.reject_unknown(validation.json_body(), set())
    with context.session() as db:
        find_san(db, name, "name", missing=SanNotFound)
    return submit_job("refresh-san", {"san": name})


def find_san(db: Session, name: Any, field: str, *, missing: type[LaxError]) -> San:
    """The SAN called `name` (validated as field `field`), else `missing` (404 for a URL, 422 for a body)."""
    validation.name(name, field)
    san = db.scalar(select(San).options(joinedload(San.site)).where(San.name == name))
    if san is None:
        raise missing(f"no SAN {name}", field=field, name=name)
    return san


# -- volumes ------------------------------------------------------------------

@volumes.get("/volumes/<volume_id>")
@operation("Show one volume: its SAN, VM, role, size and iSCSI export", response=VOLUME_SCHEMA)
def volume_show(volume_id: str):
    with context.session() as db:
        return jsonify(volume_json(*_volume(db, volume_id)))


@volumes.post("/volumes/<volume_id>/actions/resize")
@operation("Grow or (safely, VM stopped) shrink a volume, as a job on its site's SAN queue", status=202,
           response=ref("Job"), body={"type": "object", "required": ["size"],
                                      "properties": {"size": sizes.schema(sizes.DISK_BOUNDS)}})
def volume_resize(volume_id: str):
    body = validation.json_body()
    validation.reject_unknown(body, {"size"})
    size_bytes = sizes.disk(body.get("size"), "size")
    with context.session() as db:
        volume, _, _ = _volume(db, volume_id)
    return submit_job("resize-volume", {"volume_id": volume.id, "size_bytes": size_bytes})


def volumes_query():
    """Volumes with their SAN (and its site) and the name of their VM, in one statement."""
    return (select(Volume, San, VirtualMachine.name).join(San, Volume.san_id == San.id).options(joinedload(San.site))
            .outerjoin(VirtualMachine, Volume.vm_id == VirtualMachine.id))


def _volume(db: Session, volume_id: str) -> tuple[Volume, San, str | None]:
    number = validation.integer(volume_id, "volume_id", 1, 2**62)
    row = db.execute(volumes_query().where(Volume.id == number)).first()
    if row is None:
        raise VolumeNotFound(f"no volume {number}", volume_id=number)
    return row[0], row[1], row[2]


# -- templates ----------------------------------------------------------------

@templates.get("/templates")
@operation("List templates: the read-only volumes new VMs are cloned from", response=items_of(TEMPLATE_SCHEMA),
           query={"san": {"type": "string"}})
def template_index():
    query = (select(Template, San).outerjoin(San, Template.san_id == San.id).options(joinedload(San.site))
             .order_by(Template.name, San.name))
    if "san" in request.args:
        query = query.where(San.name == validation.name(request.args["san"], "san"))
    with context.session() as db:
        return jsonify(items=[template_json(template, san) for template, san in db.execute(query)])


@templates.post("/templates")
@operation("Import a raw or qcow2 image from the import directory of a SAN host as a template, as a job on that "
           "SAN's queue (admin: the SAN reads the file as root)", role="admin", status=202,
           response=ref("Job"), body={"type": "object", "required": ["name", "san", "source_path", "format"], "properties": {
               "name": _TEXT, "san": _TEXT,
               "source_path": {"type": "string", "description": "absolute path of a regular file in the SAN host's "
                                                               "import directory (templates.import_dir)"},
               "format": {"enum": list(IMAGE_FORMATS), "description": "the image's format (never probed)"},
               "os": {"type": "string", "default": "linux"}, "default_size": sizes.schema(sizes.DISK_BOUNDS)}})
def template_import():
    body = validation.json_body()
    validation.reject_unknown(body, {"name", "san", "source_path", "format", "os", "default_size"})
    name = validation.name(body.get("name"), "name")
    params: dict[str, Any] = {"name": name, "san": body.get("san"), "source_path": _importable_path(body.get("source_path")),
                              "format": _image_format(body.get("format")), "os": _os_name(body.get("os", "linux"))}
    if "default_size" in body:
        params["default_size_bytes"] = sizes.disk(body["default_size"], "default_size")
    with context.session() as db:
        san = find_san(db, params["san"], "san", missing=UnknownSan)
        if db.scalar(select(Template.id).where(Template.name == name, Template.san_id == san.id)) is not None:
            raise TemplateExists(f"template {name} exists on {san.name}", name=name, san=san.name)
    return submit_job("import-template", params)


def _importable_path(value: Any) -> str:
    """An absolute, normalised path without '..' inside the import directory (it names a file on the SAN host,
    never a shell word). The SAN checks it again with symlinks resolved: only it sees the file."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_PATH or any(c < " " for c in value):
        raise validation.invalid("source_path", f"must be an absolute path of at most {MAX_PATH} printable characters")
    path = PurePosixPath(value)
    if ".." in path.parts or path == PurePosixPath("/"):
        raise validation.invalid("source_path", "must name a file, without '..'")
    import_dir = PurePosixPath(os.path.abspath(context.runtime().config.import_dir))
    if path == import_dir or not path.is_relative_to(import_dir):
        raise ImportSourceRefused(f"{path} is not in the import directory {import_dir}: templates are imported "
                                  "only from there", field="source_path", source=str(path))
    return str(path)


def _image_format(value: Any) -> str:
    if value not in IMAGE_FORMATS:
        raise validation.invalid("format", f"must be one of {', '.join(IMAGE_FORMATS)} (the image's format is "
                                           "never guessed from its content)")
    return value


def _os_name(value: Any) -> str:
    if not isinstance(value, str) or not OS_NAME.fullmatch(value):
        raise validation.invalid("os", "must be 1-63 characters of a-z, 0-9, '.', '_' and '-'")
    return value
