"""The HTTP face of virtual machines: the overview (active and inactive), one VM, install, power actions, delete.

Every change is a job on the control queue holding the lock `vm/<name>`. An install reserves the VM
row and its lease in the same transaction as its job, so a refused install leaves nothing behind.
"""

import re
from typing import Any

from flask import Blueprint, jsonify, request
from sqlalchemy import Row, Select, func, select
from sqlalchemy.orm import Session

from api import context, sizes, validation
from api.changes import submit_job
from api.openapi import operation, ref
from api.representations import iso
from api.storage import VOLUME_SCHEMA, volume_json, volumes_query
from errors import UnknownAction, VmNotFound
from models import FAILED, ClusterServer, Job, Lease, San, Subnet, Template, VirtualMachine, Volume
from tasks.inventory import vms
from tasks.san.maintenance import checked_for_san
from tasks.kinds import (
    MAX_BANDWIDTH_MIB_S,
    MAX_SHUTDOWN_TIMEOUT_S,
    Migrate,
    Power,
    Rescue,
    request_schema,
)

blueprint = Blueprint("vms", __name__)

ACTIONS = ("start", "shutdown", "reboot", "destroy", "migrate", "rescue")
MIGRATE_FIELDS = {"to", "live", "check", "bandwidth_mib_s"}
ACTION_FIELDS = {"start": {"on_san"}, "shutdown": {"timeout_s"}, "reboot": {"timeout_s"}, "migrate": MIGRATE_FIELDS,
                 "rescue": {"end"}}
# The true/false switch of an action: rescue's `end`, start's `on_san`.
ACTION_FLAGS = {"rescue": "end", "start": "on_san"}
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
INSTALL_FIELDS = {"name", "template", "memory", "vcpus", "disk", "subnet", "server", "ssh_keys", "description", "ha",
                  "ha_priority"}
HA_PRIORITY_BOUNDS = (0, 1000)
MAX_SSH_KEYS, MAX_SSH_KEY_LENGTH, MAX_DESCRIPTION = 32, 8192, 1024
SSH_KEY = re.compile(r"^[a-z0-9@.-]{3,64} [A-Za-z0-9+/]+={0,3}( [^\x00-\x1f\x7f]*)?$")
STATE = re.compile(r"^[a-z ]{1,31}$")
# The overview's active VMs: running on a server, in their rescue system, or on their SAN host.
RUNNING_SOMEWHERE = vms.ACTIVE_STATES | {vms.RESCUE, vms.MAINTENANCE}


_INT = {"type": ["integer", "null"]}
_TEXT = {"type": ["string", "null"]}
VM_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "server": _TEXT,
    "host": {"type": ["string", "null"], "description": "where it runs: its server, or its SAN in maintenance"},
    "domain_id": _INT, "memory_bytes": {"type": "integer"},
    "vcpus": {"type": "integer"}, "state": {"type": "string"}, "cpu_time_ns": _INT, "disk_bytes": _INT,
    "mac": _TEXT, "ip": _TEXT, "subnet": _TEXT, "hostname": _TEXT, "template": _TEXT,
    "description": {"type": "string"}}}
VM_DETAIL_SCHEMA = {"type": "object", "properties": {
    **VM_SCHEMA["properties"], "uuid": {"type": "string"}, "desired_state": {"type": "string"},
    "hypervisor": {"type": "string"}, "ssh_keys": {"type": "array"}, "ha": {"type": "boolean"},
    "ha_priority": {"type": "integer"},
    "state_updated_at": _TEXT, "created_at": {"type": "string"}, "error": _TEXT, "volumes": {"type": "array", "items": VOLUME_SCHEMA}}}
OVERVIEW_SCHEMA = {"type": "object", "properties": {
    "active": {"type": "array", "items": VM_SCHEMA}, "inactive": {"type": "array", "items": VM_SCHEMA},
    "next": {"type": ["string", "null"], "description": "pass as `after` for the next page; null on the last"}}}
INSTALL_SCHEMA = {"type": "object", "required": ["name", "template", "memory", "vcpus", "disk"], "properties": {
    "name": {"type": "string", "pattern": validation.NAME.pattern, "maxLength": vms.MAX_VM_NAME},
    "template": {"type": "string"}, "memory": sizes.schema(sizes.MEMORY_BOUNDS),
    "vcpus": {"type": "integer", "minimum": sizes.VCPU_BOUNDS[0], "maximum": sizes.VCPU_BOUNDS[1]},
    "disk": sizes.schema(sizes.DISK_BOUNDS), "subnet": {"type": "string", "description": "lease an address here"},
    "server": {"type": "string", "description": "run it here instead of where there is most room"},
    "ssh_keys": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_SSH_KEYS},
    "description": {"type": "string", "maxLength": MAX_DESCRIPTION},
    "ha": {"type": "boolean", "description": "restart it on another server when its server fails (default true)"},
    "ha_priority": {"type": "integer", "minimum": HA_PRIORITY_BOUNDS[0], "maximum": HA_PRIORITY_BOUNDS[1],
                    "description": "higher restarts first when not all fit"}}}


# -- reading ------------------------------------------------------------------------------------

@blueprint.get("/vms")
@operation("The overview: VMs by name, active and inactive apart, a page at a time", response=OVERVIEW_SCHEMA, query={
    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    "after": {"type": "string", "description": "the `next` of the previous page"},
    "state": {"type": "string", "description": "only VMs in this state (running, shut off, installing ...)"}})
def index():
    limit = validation.integer(request.args.get("limit", DEFAULT_LIMIT), "limit", 1, MAX_LIMIT)
    query = overview_query().order_by(VirtualMachine.name).limit(limit + 1)
    if "after" in request.args:
        query = query.where(VirtualMachine.name > validation.name(request.args["after"], "after"))
    if "state" in request.args:
        query = query.where(VirtualMachine.state == _state(request.args["state"]))
    with context.session() as db:
        rows = db.execute(query).all()
        page = overview_lines(db, rows[:limit])
    return jsonify(active=[vm for vm in page if vm["state"] in RUNNING_SOMEWHERE],
                   inactive=[vm for vm in page if vm["state"] not in RUNNING_SOMEWHERE],
                   next=page[-1]["name"] if len(rows) > limit else None)


@blueprint.get("/vms/<name>")
@operation("Show one VM: state, server, MAC and IP, volumes, template", response=VM_DETAIL_SCHEMA)
def show(name: str):
    validation.name(name, "name")
    with context.session() as db:
        return jsonify(vm_detail(db, name))


def vm_detail(db: Session, name: str) -> dict[str, Any]:
    """VM `name` as `GET /vms/<name>` shows it: its overview line, identity, wishes, volumes and last error."""
    vm = db.scalar(select(VirtualMachine).where(VirtualMachine.name == name))
    if vm is None:
        raise VmNotFound(f"no VM {name}", vm=name)
    shown = overview_lines(db, db.execute(overview_query().where(VirtualMachine.id == vm.id)).all())[0]
    disks = db.execute(volumes_query().where(Volume.vm_id == vm.id).order_by(Volume.role, Volume.name))
    shown.update(uuid=vm.uuid, desired_state=vm.desired_state, hypervisor=vm.hypervisor, ssh_keys=vm.ssh_keys,
                 ha=vm.ha, ha_priority=vm.ha_priority,
                 state_updated_at=iso(vm.state_updated_at), created_at=iso(vm.created_at),
                 volumes=[volume_json(*disk) for disk in disks], error=_error_of(db, vm))
    return shown


def _error_of(db: Session, vm: VirtualMachine) -> str | None:
    """Why a VM is in state `error`: the message of the last job on it that failed (it names what is left)."""
    if vm.state != "error":
        return None
    return db.scalar(select(Job.error_message).where(Job.target == f"vm/{vm.name}", Job.state == FAILED,
                                                     Job.parent_id.is_(None)).order_by(Job.finished_at.desc()).limit(1))


def vm_json(row: Row) -> dict[str, Any]:
    """One line of the overview from a row of `overview_query()`; `mac`, `ip`, `subnet` and `hostname` are
    filled in by _add_addresses."""
    return {"name": row.name, "server": row.server, "host": row.san if row.state == vms.MAINTENANCE else row.server,
            "domain_id": row.domain_id, "memory_bytes": row.memory_bytes, "vcpus": row.vcpus, "state": row.state,
            "cpu_time_ns": row.cpu_time_ns, "disk_bytes": None if row.disk_bytes is None else int(row.disk_bytes),
            "mac": None, "ip": None, "template": row.template, "description": row.description, "subnet": None,
            "hostname": None}


def overview_lines(db: Session, rows: list[Row]) -> list[dict[str, Any]]:
    """The overview lines of rows of `overview_query()`, addresses filled in."""
    by_id = {row.id: vm_json(row) for row in rows}
    _add_addresses(db, by_id)
    return list(by_id.values())


def overview_query() -> Select:
    """The overview's columns of VMs with their server's, template's and SAN's names and their disk size: one
    statement for any number of rows. Plain columns, not ORM objects, and a disk sum per VM selected rather than
    one over every volume, so a page costs what its rows cost."""
    disk_bytes = (select(func.sum(Volume.size_bytes)).where(Volume.vm_id == VirtualMachine.id, Volume.role == "disk")
                  .correlate(VirtualMachine).scalar_subquery())
    return (select(VirtualMachine.id, VirtualMachine.name, VirtualMachine.domain_id, VirtualMachine.memory_bytes,
                   VirtualMachine.vcpus, VirtualMachine.state, VirtualMachine.cpu_time_ns, VirtualMachine.description,
                   ClusterServer.name.label("server"), Template.name.label("template"),
                   disk_bytes.label("disk_bytes"), San.name.label("san"))
            .outerjoin(ClusterServer, VirtualMachine.server_id == ClusterServer.id)
            .outerjoin(Template, VirtualMachine.template_id == Template.id)
            .outerjoin(San, Template.san_id == San.id))


def _add_addresses(db: Session, by_id: dict[int, dict[str, Any]]) -> None:
    """Fill in each VM's (row id -> JSON) address from its first lease, in one statement for the whole page."""
    if not by_id:
        return
    leases = db.execute(select(Lease.vm_id, Lease.mac, Lease.ip, Lease.hostname, Subnet.name)
                        .join(Subnet, Lease.subnet_id == Subnet.id)
                        .where(Lease.vm_id.in_(by_id)).order_by(Lease.id.desc()))
    for vm_id, mac, ip, hostname, subnet in leases:
        # Newest first, so the oldest lease of a VM is the one left standing.
        by_id[vm_id].update(mac=mac, ip=ip, subnet=subnet, hostname=hostname)


def _state(value: str) -> str:
    if not STATE.fullmatch(value):
        raise validation.invalid("state", "must be a VM state like running or shut off")
    return value


# -- changing -----------------------------------------------------------------------------------

@blueprint.post("/vms")
@operation("Install a VM from a template: reserve its name and address now, then place, clone, customize and start it "
           "as an install-vm job", status=202, response=ref("Job"), body=INSTALL_SCHEMA)
def install():
    wanted = install_request(validation.json_body())
    config = context.runtime().config

    def reserve(db: Session) -> None:
        vms.reserve_vm(db, config, wanted)

    return submit_job("install-vm", {"vm": wanted.name, "disk_bytes": wanted.disk_bytes, "server": wanted.server},
                      prepare=reserve)


@blueprint.post("/vms/<name>/actions/<action>")
@operation("Start (on_san: true runs it on its SAN host for maintenance, its exports locked), shut down (ACPI, "
           "optional timeout_s), reboot, destroy (power off), migrate a VM, or boot the stopped VM into its rescue "
           "system (rescue; end: true puts its own domain back), as a job",
           status=202, response=ref("Job"), body=request_schema(Power, Migrate, Rescue, exclude=frozenset({"vm"})))
def act(name: str, action: str):
    return submit_job(action, action_params(name, action, validation.json_body()))


def action_params(name: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
    """The job parameters of `action` on VM `name` from a request body, every field checked; VmNotFound, or a
    409 when the VM's state does not allow the action."""
    if action not in ACTIONS:
        raise UnknownAction(f"no action {action!r} for a VM (one of {', '.join(ACTIONS)})", action=action)
    validation.reject_unknown(body, ACTION_FIELDS.get(action, set()))
    flag = _flag(body, ACTION_FLAGS[action], False) if action in ACTION_FLAGS else False
    _refuse_if_state_forbids(name, action, flag)
    params: dict[str, Any] = {"vm": name}
    if ACTION_FLAGS.get(action) in body:
        params[ACTION_FLAGS[action]] = flag
    if "timeout_s" in body:
        params["timeout_s"] = validation.integer(body["timeout_s"], "timeout_s", 1, MAX_SHUTDOWN_TIMEOUT_S)
    if action == "migrate":
        params.update(migrate_params(body))
    return params


def _refuse_if_state_forbids(name: str, action: str, flag: bool) -> None:
    """VmNotFound, or a 409 when the VM's state does not allow the action (a rescue, a start on the SAN host,
    or a start or move of a VM in rescue or maintenance) rather than a job that fails."""
    with context.session() as db:
        vm = vm_named(db, name)
        if action == "rescue":
            vms.check_rescue(vm, end=flag)
        elif action == "start" and flag:
            checked_for_san(db, context.runtime().config, vm)
        elif action in ("start", "migrate"):
            vms.refuse_while_away(vm)


@blueprint.delete("/vms/<name>")
@operation("Delete a VM: stop and undefine it, unexport and delete its volumes, release its lease, as a job",
           status=202, response=ref("Job"))
def delete(name: str):
    validation.reject_unknown(validation.json_body(), set())
    with context.session() as db:
        vm_named(db, name)
    return submit_job("delete-vm", {"vm": name})


def migrate_params(body: dict[str, Any]) -> dict[str, Any]:
    """The migrate job's parameters from a request body: destination, live (default true), check, bandwidth."""
    params: dict[str, Any] = {"live": _flag(body, "live", True), "check": _flag(body, "check", False)}
    if body.get("to") is not None:
        params["to"] = validation.name(body["to"], "to")
    if body.get("bandwidth_mib_s") is not None:
        params["bandwidth_mib_s"] = validation.integer(body["bandwidth_mib_s"], "bandwidth_mib_s", 1, MAX_BANDWIDTH_MIB_S)
    return params


def _flag(body: dict[str, Any], field: str, default: bool) -> bool:
    value = body.get(field, default)
    if not isinstance(value, bool):
        raise validation.invalid(field, "must be true or false")
    return value


def install_request(body: dict[str, Any]) -> vms.InstallRequest:
    """The install request a POST /vms body asks for, every field checked (InvalidInput naming the first bad one)."""
    validation.reject_unknown(body, INSTALL_FIELDS)
    return vms.InstallRequest(
        name=vm_name(body.get("name")),
        template=validation.name(body.get("template"), "template"),
        memory_bytes=sizes.memory(body.get("memory")),
        vcpus=_vcpus(body.get("vcpus")),
        disk_bytes=sizes.disk(body.get("disk")),
        subnet=_optional_name(body, "subnet"),
        server=_optional_name(body, "server"),
        ssh_keys=_ssh_keys(body.get("ssh_keys", [])),
        description=_description(body.get("description", "")),
        ha=_boolean(body.get("ha", True), "ha"),
        ha_priority=_ha_priority(body.get("ha_priority", 0)),
    )


def vm_name(value: Any, field: str = "name") -> str:
    """A new VM's name: `[a-z0-9-]`, starting with a letter or digit, short enough for its volumes' names."""
    name = validation.name(value, field)
    if name.startswith("-") or len(name) > vms.MAX_VM_NAME:
        raise validation.invalid(field, f"must start with a-z or 0-9 and be at most {vms.MAX_VM_NAME} characters")
    return name


def _boolean(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise validation.invalid(field, "must be true or false")
    return value


def _ha_priority(value: Any) -> int:
    if isinstance(value, (str, bool)):
        raise validation.invalid("ha_priority", "must be a JSON integer")
    return validation.integer(value, "ha_priority", *HA_PRIORITY_BOUNDS)


def _vcpus(value: Any) -> int:
    # A JSON number, not the digit strings validation.integer also takes from query strings.
    if isinstance(value, str):
        raise validation.invalid("vcpus", "must be a JSON integer")
    return validation.integer(value, "vcpus", *sizes.VCPU_BOUNDS)


def _optional_name(body: dict[str, Any], field: str) -> str | None:
    return None if body.get(field) is None else validation.name(body[field], field)


def _ssh_keys(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_SSH_KEYS:
        raise validation.invalid("ssh_keys", f"must be a list of at most {MAX_SSH_KEYS} public keys")
    keys = [key.strip() if isinstance(key, str) else key for key in value]
    for key in keys:
        if not isinstance(key, str) or len(key) > MAX_SSH_KEY_LENGTH or not SSH_KEY.fullmatch(key):
            raise validation.invalid("ssh_keys", "each must be one OpenSSH public key line: TYPE BASE64 [COMMENT]")
    return keys


def _description(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_DESCRIPTION or any(c < " " and c != "\t" for c in value):
        raise validation.invalid("description", f"must be one line of at most {MAX_DESCRIPTION} characters")
    return value


def vm_named(db: Session, name: str) -> VirtualMachine:
    """The VM a URL names (a valid name), else VmNotFound."""
    validation.name(name, "name")
    return vms.find_vm(db, name)
