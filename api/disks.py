"""The HTTP face of a VM's disks: list them, add a data disk, remove one. Disks are named by their volume id;
a label is the operator's note, never how a disk is found. Changes are jobs holding the VM's lock `vm/<name>`."""

from typing import Any

from flask import Blueprint, jsonify
from sqlalchemy.orm import Session

from api import context, sizes, validation
from api.changes import submit_job
from api.ipam import items_of
from api.openapi import operation, ref
from api.storage import VOLUME_SCHEMA, volume_json, volumes_query
from api.vms import vm_named
from models import Volume
from tasks.control.disks import check_room, data_disk_of
from tasks.inventory.vms import DATA_ROLE

blueprint = Blueprint("disks", __name__)

ADD_FIELDS = {"size", "label", "name"}
ADD_SCHEMA = {"type": "object", "required": ["size"], "properties": {
    "size": sizes.schema(sizes.DISK_BOUNDS),
    "label": {"type": "string", "pattern": validation.NAME.pattern, "description": "a note shown with the disk"},
    "name": {"type": "string", "pattern": validation.NAME.pattern, "description": "another word for label"}}}
SHOWN_ROLES = ("disk", DATA_ROLE)


@blueprint.get("/vms/<name>/disks")
@operation("List a VM's disks (boot disk and data disks) by volume id, in LUN order",
           response=items_of(VOLUME_SCHEMA))
def index(name: str):
    with context.session() as db:
        return jsonify(items=vm_disks_json(db, vm_named(db, name).id))


def vm_disks_json(db: Session, vm_id: int) -> list[dict[str, Any]]:
    rows = db.execute(volumes_query().where(Volume.vm_id == vm_id, Volume.role.in_(SHOWN_ROLES))
                      .order_by(Volume.iscsi_lun, Volume.id))
    return [volume_json(*row) for row in rows]


@blueprint.post("/vms/<name>/disks")
@operation("Add a data disk: a volume on the VM's SAN, exported as its target's next LUN, hot-plugged into a "
           "running VM (else attached at its next start), as an add-disk job", status=202, response=ref("Job"),
           body=ADD_SCHEMA)
def add(name: str):
    body = validation.json_body()
    validation.reject_unknown(body, ADD_FIELDS)
    size_bytes = sizes.disk(body.get("size"), "size")
    label = _label(body)
    with context.session() as db:
        check_room(db, vm_named(db, name))
    return submit_job("add-disk", {"vm": name, "size_bytes": size_bytes, "label": label})


@blueprint.delete("/vms/<name>/disks/<volume_id>")
@operation("Remove a data disk: detach it (live if the VM runs), unexport its LUN and delete its volume, as a "
           "remove-disk job; the boot disk is refused", status=202, response=ref("Job"))
def remove(name: str, volume_id: str):
    validation.reject_unknown(validation.json_body(), set())
    number = validation.integer(volume_id, "volume_id", 1, 2**62)
    with context.session() as db:
        data_disk_of(db, vm_named(db, name), number)
    return submit_job("remove-disk", {"vm": name, "volume_id": number})


def _label(body: dict[str, Any]) -> str | None:
    if "label" in body and "name" in body:
        raise validation.invalid("label", "give label or name, not both")
    value = body.get("label", body.get("name"))
    return None if value is None else validation.name(value, "label")
