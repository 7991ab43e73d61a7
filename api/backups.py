"""The HTTP face of backups: backing a VM up, listing, verifying and restoring backups, stores and policies.

Backup, verify and restore are jobs on the `san.<site>` queue of the SAN that holds (or held) the
volume. A VM's backups hold the lock `backup/<vm>`, so one backup of a VM runs at a time while its
power jobs (`vm/<vm>`) go on; an in-place restore holds `vm/<vm>`, so the VM cannot start meanwhile.
Stores and policies are DB changes (no job). A store's credentials are accepted, never returned.
"""

from typing import Any

from croniter import croniter
from flask import Blueprint, jsonify, request, url_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import context, validation
from api.changes import audit, submit_job
from api.ipam import items_of
from api.openapi import operation, ref
from api.representations import iso
from api.vms import vm_name
from errors import (
    BackupNotFound,
    Conflict,
    NoDisks,
    NotFound,
    PolicyExists,
    PolicyNotFound,
    StoreExists,
    UnknownStore,
    VmNotFound,
)
from models import San, Site, Template, VirtualMachine, Volume
from models.protection import Backup, BackupPolicy, BackupStore
from tasks.inventory import vms
from tasks.kinds import SnapshotBackup, request_schema
from tasks.san import backups as backup_jobs

backups = Blueprint("backups", __name__)
stores = Blueprint("stores", __name__)
policies = Blueprint("policies", __name__)

MAX_LOCATION = 1023
MAX_SCHEDULE = 127
RETENTION_KEYS = ("keep_last", "daily", "weekly", "monthly")
MAX_RETENTION = 10_000
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
_TEXT = {"type": "string"}
_NTEXT = {"type": ["string", "null"]}
_INT = {"type": "integer"}


BACKUP_SCHEMA = {"type": "object", "properties": {
    "id": _TEXT, "vm": _TEXT, "volume": _TEXT, "group": {"type": ["string", "null"]}, "san": _TEXT, "store": _TEXT, "mode": {"enum": ["full", "diff"]},
    "parent": _NTEXT, "state": {"enum": ["complete", "verified", "corrupt"]}, "snapshot": _NTEXT,
    "chunks": _INT, "size_bytes": _INT,
    "stored_bytes": {"type": "integer", "description": "compressed bytes this backup added to its store"},
    "bytes_read": {"type": "integer", "description": "bytes read from the snapshot (a differential reads what changed)"},
    "error": _NTEXT, "created_at": _TEXT, "verified_at": _NTEXT}}
STORE_SCHEMA = {"type": "object", "properties": {
    "name": _TEXT, "kind": {"enum": list(backup_jobs.STORE_KINDS)},
    "location": {"type": "string", "description": "local: a directory on the SAN host; ssh: user@host:/path"},
    "has_credentials": {"type": "boolean"}}}
RETENTION_SCHEMA = {"type": "object", "properties": {key: {"type": "integer", "minimum": 0} for key in RETENTION_KEYS}}
POLICY_SCHEMA = {"type": "object", "properties": {
    "name": _TEXT, "vms": {"type": "array", "items": _TEXT}, "tag": _NTEXT,
    "schedule": {"type": "string", "description": "cron expression (UTC) of when backups run"},
    "mode": {"enum": ["full", "diff"], "description": "what a run makes"},
    "full_schedule": {"type": ["string", "null"], "description": "cron expression: runs due on it are full"},
    "store": _TEXT, "retention": RETENTION_SCHEMA, "enabled": {"type": "boolean"}, "last_run_at": _NTEXT}}


# -- backups ------------------------------------------------------------------------------------

@backups.post("/vms/<name>/backups")
@operation("Back up a running or stopped VM from a snapshot of each disk: full, or differential (only what "
           "changed since the last backup in the store), as a snapshot-backup job on its SAN's queue",
           status=202, response=ref("Job"), body=request_schema(SnapshotBackup, exclude=frozenset({"vm", "policy"})))
def create(name: str):
    with context.session() as db:
        params = backup_params(db, name, validation.json_body())
    return submit_job("snapshot-backup", params)


def backup_params(db: Session, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """The snapshot-backup job's parameters for VM `name` from a request body (mode, store), every field checked."""
    validation.reject_unknown(body, {"mode", "store"})
    mode = validation.choice(body.get("mode", "full"), "mode", backup_jobs.MODES)
    params: dict[str, Any] = {"vm": validation.name(name, "name"), "mode": mode}
    _check_has_disks(db, name)
    params["store"] = _store_name(db, body.get("store"))
    return params


@backups.get("/backups")
@operation("List backups, newest first, with their sizes and the bytes each read", response=items_of(BACKUP_SCHEMA),
           query={"vm": {"type": "string"}, "store": {"type": "string"},
                  "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}})
def index():
    limit = validation.integer(request.args.get("limit", DEFAULT_LIMIT), "limit", 1, MAX_LIMIT)
    query = backups_query().order_by(Backup.created_at.desc(), Backup.id).limit(limit)
    if "vm" in request.args:
        query = query.where(Backup.vm_name == validation.name(request.args["vm"], "vm"))
    if "store" in request.args:
        query = query.where(BackupStore.name == validation.name(request.args["store"], "store"))
    with context.session() as db:
        return jsonify(items=[backup_json(*row) for row in db.execute(query)])


@backups.get("/backups/<backup_id>")
@operation("Show one backup", response=BACKUP_SCHEMA)
def show(backup_id: str):
    with context.session() as db:
        return jsonify(backup_json(*backup_named(db, backup_id)))


@backups.post("/backups/<backup_id>/actions/verify")
@operation("Re-read and re-hash every chunk of a backup, as a verify-backup job; a bad chunk marks it corrupt. "
           "With `boot`, the backup is then restored as a scratch VM and booted, and the job reports whether it "
           "came up (the scratch VM is removed either way)",
           status=202, response=ref("Job"), body={"type": "object", "properties": {"boot": {"type": "boolean", "default": False}}})
def verify(backup_id: str):
    body = validation.json_body()
    validation.reject_unknown(body, {"boot"})
    if body.get("boot", False) not in (True, False):
        raise validation.invalid("boot", "must be true or false")
    if body.get("boot"):
        scratch = f"verify-{backup_id.replace('-', '')[:12]}"
        return _restore_as_vm(backup_id, scratch, kind="verify-boot")
    with context.session() as db:
        backup_named(db, backup_id)
    return submit_job("verify-backup", {"backup": backup_id})


@backups.post("/backups/<backup_id>/actions/restore")
@operation("Restore a backup bit for bit, as a job: to a new volume on the backup's SAN (named `as`), in place "
           "onto its VM's disk while the VM is stopped, or as a new VM (`as_vm`, with a new lease) that is started",
           status=202, response=ref("Job"),
           body={"type": "object", "properties": {
               "as": {"type": "string", "description": "name of the new volume (default: <volume>-r<backup>)"},
               "in_place": {"type": "boolean", "default": False},
               "as_vm": {"type": "string", "description": "name of a new VM made from the backup (like its VM)"}}})
def restore(backup_id: str):
    body = validation.json_body()
    validation.reject_unknown(body, {"as", "in_place", "as_vm"})
    in_place = body.get("in_place", False)
    if not isinstance(in_place, bool):
        raise validation.invalid("in_place", "must be true or false")
    if sum((in_place, body.get("as") is not None, body.get("as_vm") is not None)) > 1:
        raise validation.invalid("as", "a restore goes in place, to a new volume `as` or to a new VM `as_vm`: one of them")
    if body.get("as_vm") is not None:
        return _restore_as_vm(backup_id, body["as_vm"])
    params: dict[str, Any] = {"backup": backup_id, "in_place": in_place}
    with context.session() as db:
        backup, _ = backup_named(db, backup_id)
        _check_san_exists(db, backup.san_name)
        if body.get("as") is not None:
            params["as"] = _new_volume_name(db, body["as"], backup.san_name)
    return submit_job("restore", params)


def _restore_as_vm(backup_id: str, name: Any, *, kind: str = "restore-vm"):
    """A new VM like the backed-up one (template, memory, vCPUs), its lease reserved now, its disk the backup's."""
    new_name = vm_name(name, "as_vm")
    with context.session() as db:
        backup, _ = backup_named(db, backup_id)
        original = db.scalar(select(VirtualMachine).where(VirtualMachine.name == backup.vm_name))
        if original is None or original.template_id is None:
            raise VmNotFound(f"VM {backup.vm_name} is gone or was not made from a template: nothing to model "
                             f"{new_name} on; restore to a volume with `as` instead", field="as_vm")
        template = db.get(Template, original.template_id).name
        request_ = vms.InstallRequest(name=new_name, template=template, memory_bytes=original.memory_bytes,
                                      vcpus=original.vcpus, disk_bytes=backup.size_bytes, san=backup.san_name,
                                      description=f"restored from backup {backup.id} of {backup.vm_name}")
    return submit_job(kind, {"vm": new_name, "backup": backup_id, "disk_bytes": backup.size_bytes},
                      prepare=lambda db: vms.reserve_vm(db, context.runtime().config, request_))


def backup_json(backup: Backup, store: str) -> dict[str, Any]:
    return {"id": backup.id, "vm": backup.vm_name, "volume": backup.volume_name, "group": backup.group_id,
            "san": backup.san_name,
            "store": store, "mode": backup.mode, "parent": backup.parent_id, "state": backup.state,
            "snapshot": backup.snapshot, "chunks": backup.chunks, "size_bytes": backup.size_bytes,
            "stored_bytes": backup.stored_bytes, "bytes_read": backup.bytes_read, "error": backup.error,
            "created_at": iso(backup.created_at), "verified_at": iso(backup.verified_at)}


def backups_query():
    return select(Backup, BackupStore.name).join(BackupStore, Backup.store_id == BackupStore.id)


def backup_named(db: Session, backup_id: str) -> tuple[Backup, str]:
    """The backup a URL names and its store's name; BackupNotFound if there is none."""
    if not isinstance(backup_id, str) or len(backup_id) > 36:
        raise BackupNotFound(f"no backup {backup_id}", backup=backup_id)
    row = db.execute(backups_query().where(Backup.id == backup_id)).first()
    if row is None:
        raise BackupNotFound(f"no backup {backup_id}", backup=backup_id)
    return row[0], row[1]


def _check_has_disks(db: Session, name: str) -> None:
    """Refuse a backup of a VM that is gone or has no disk on a SAN."""
    vm_id = db.scalar(select(VirtualMachine.id).where(VirtualMachine.name == name))
    if vm_id is None:
        raise VmNotFound(f"no VM {name}", vm=name)
    site = db.scalar(select(Site.name).join(San, San.site_id == Site.id).join(Volume, Volume.san_id == San.id)
                     .where(Volume.vm_id == vm_id, Volume.role == "disk").limit(1))
    if site is None:
        raise NoDisks(f"VM {name} has no disk volumes", vm=name)


def _check_san_exists(db: Session, san: str) -> None:
    if db.scalar(select(San.id).where(San.name == san)) is None:
        raise NotFound(f"the backup's SAN {san} is gone", san=san)


def _store_name(db: Session, value: Any) -> str:
    """The store a request names (it must exist), else the default store, else the only store."""
    if value is None:
        return backup_jobs.store_ref(db, None, backup_jobs.default_store(context.runtime().config)).name
    name = validation.name(value, "store")
    if db.scalar(select(BackupStore.id).where(BackupStore.name == name)) is None:
        raise UnknownStore(f"no backup store {name}", store=name)
    return name


def _new_volume_name(db: Session, value: Any, san: str) -> str:
    name = validation.name(value, "as")
    taken = db.scalar(select(Volume.id).join(San, Volume.san_id == San.id).where(San.name == san, Volume.name == name))
    if taken is not None:
        raise Conflict(f"volume {name} already exists on {san}", volume=name)
    return name


# -- stores -------------------------------------------------------------------------------------

@stores.get("/stores")
@operation("List backup stores (credentials are never shown)", response=items_of(STORE_SCHEMA))
def store_index():
    with context.session() as db:
        return jsonify(items=[store_json(s) for s in db.scalars(select(BackupStore).order_by(BackupStore.name))])


@stores.post("/stores")
@operation("Add a backup store: a directory on the SAN host, or a directory on another host over SSH "
           "(a DB change, no job)", role="admin", status=201, response=STORE_SCHEMA,
           body={"type": "object", "required": ["name", "kind", "location"], "properties": {
               "name": _TEXT, "kind": {"enum": list(backup_jobs.STORE_KINDS)}, "location": _TEXT,
               "credentials": {"type": "object", "description": "ssh: private_key (OpenSSH text), known_hosts line"}}})
def store_create():
    body = validation.json_body()
    validation.reject_unknown(body, {"name", "kind", "location", "credentials"})
    name = validation.name(body.get("name"), "name")
    kind = validation.choice(body.get("kind"), "kind", backup_jobs.STORE_KINDS)
    location = _location(body.get("location"), kind)
    credentials = body.get("credentials", {})
    if not isinstance(credentials, dict) or not all(isinstance(v, str) for v in credentials.values()):
        raise validation.invalid("credentials", "must be an object of strings")
    with context.session() as db:
        if db.scalar(select(BackupStore.id).where(BackupStore.name == name)) is not None:
            raise StoreExists(f"backup store {name} exists", store=name)
        store = BackupStore(name=name, kind=kind, location=location, credentials=credentials)
        db.add(store)
        audit(db, "store.create", f"store/{name}", kind=kind, location=location)
        shown = store_json(store)
    response = jsonify(shown)
    response.status_code = 201
    return response


def store_json(store: BackupStore) -> dict[str, Any]:
    return {"name": store.name, "kind": store.kind, "location": store.location,
            "has_credentials": bool(store.credentials)}


def _location(value: Any, kind: str) -> str:
    """A store location: an absolute path without '..' (local), or user@host:/absolute/path (ssh)."""
    if not isinstance(value, str) or len(value) > MAX_LOCATION or any(c < " " or c == "\x7f" for c in value):
        raise validation.invalid("location", f"must be at most {MAX_LOCATION} printable characters")
    path = value.split(":", 1)[1] if kind == "ssh" and ":" in value else value
    if not path.startswith("/") or "/../" in f"{path}/" or path == "/":
        raise validation.invalid("location", "must be an absolute directory path without '..'"
                                 + (" after user@host:" if kind == "ssh" else ""))
    return value


# -- policies -----------------------------------------------------------------------------------

@policies.get("/policies")
@operation("List backup policies: which VMs, when (cron, UTC), full or differential, where, how many to keep",
           response=items_of(POLICY_SCHEMA))
def policy_index():
    with context.session() as db:
        rows = db.execute(select(BackupPolicy, BackupStore.name).join(BackupStore).order_by(BackupPolicy.name))
        return jsonify(items=[policy_json(*row) for row in rows])


@policies.post("/policies")
@operation("Add a backup policy; the scheduler runs it from the next due time on (a DB change, no job)",
           status=201, response=POLICY_SCHEMA, body={**POLICY_SCHEMA, "required": ["name", "schedule", "store"]})
def policy_create():
    body = validation.json_body()
    validation.reject_unknown(body, set(POLICY_SCHEMA["properties"]) - {"last_run_at"})
    name = validation.name(body.get("name"), "name")
    with context.session() as db:
        if db.scalar(select(BackupPolicy.id).where(BackupPolicy.name == name)) is not None:
            raise PolicyExists(f"policy {name} exists", policy=name)
        if "schedule" not in body or "store" not in body:
            raise validation.invalid("schedule" if "schedule" not in body else "store", "is required")
        policy = BackupPolicy(name=name, selector={}, modes={}, retention={}, enabled=True)
        _apply_policy_fields(db, policy, body)
        db.add(policy)
        db.flush()
        audit(db, "policy.create", f"policy/{name}", **body)
        shown = policy_json(policy, body["store"])
    response = jsonify(shown)
    response.status_code = 201
    response.headers["Location"] = url_for("policies.policy_show", name=name)
    return response


@policies.get("/policies/<name>")
@operation("Show one backup policy", response=POLICY_SCHEMA)
def policy_show(name: str):
    with context.session() as db:
        policy = _policy(db, name)
        return jsonify(policy_json(policy, db.get(BackupStore, policy.store_id).name))


@policies.patch("/policies/<name>")
@operation("Change a backup policy; the scheduler follows at its next tick (a DB change, no job)",
           response=POLICY_SCHEMA, body={"type": "object", "properties": {
               k: v for k, v in POLICY_SCHEMA["properties"].items() if k not in ("name", "last_run_at")}})
def policy_update(name: str):
    body = validation.json_body()
    validation.reject_unknown(body, set(POLICY_SCHEMA["properties"]) - {"name", "last_run_at"})
    with context.session() as db:
        policy = _policy(db, name)
        _apply_policy_fields(db, policy, body)
        audit(db, "policy.update", f"policy/{name}", **body)
        db.flush()
        return jsonify(policy_json(policy, db.get(BackupStore, policy.store_id).name))


def policy_json(policy: BackupPolicy, store: str) -> dict[str, Any]:
    return {"name": policy.name, "vms": list(policy.selector.get("vms", [])), "tag": policy.selector.get("tag"),
            "schedule": policy.schedule, "mode": policy.modes.get("mode", "full"),
            "full_schedule": policy.modes.get("full_schedule"), "store": store,
            "retention": {key: policy.retention.get(key, 0) for key in RETENTION_KEYS},
            "enabled": policy.enabled, "last_run_at": iso(policy.last_run_at)}


def _policy(db: Session, name: str) -> BackupPolicy:
    validation.name(name, "name")
    policy = db.scalar(select(BackupPolicy).where(BackupPolicy.name == name))
    if policy is None:
        raise PolicyNotFound(f"no policy {name}", policy=name)
    return policy


def _apply_policy_fields(db: Session, policy: BackupPolicy, body: dict[str, Any]) -> None:
    """Check and set every field `body` has; JSON columns are replaced, not mutated, so the change is saved."""
    selector, modes = dict(policy.selector), dict(policy.modes)
    if "vms" in body:
        selector["vms"] = _vm_names(body["vms"])
    if "tag" in body:
        selector["tag"] = None if body["tag"] is None else validation.name(body["tag"], "tag")
    if "schedule" in body:
        policy.schedule = _cron(body["schedule"], "schedule")
    if "mode" in body:
        modes["mode"] = validation.choice(body["mode"], "mode", backup_jobs.MODES)
    if "full_schedule" in body:
        modes["full_schedule"] = None if body["full_schedule"] is None else _cron(body["full_schedule"], "full_schedule")
    if "store" in body:
        policy.store_id = db.scalar(select(BackupStore.id).where(BackupStore.name == _store_name(db, body["store"])))
    if "retention" in body:
        policy.retention = _retention(body["retention"])
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise validation.invalid("enabled", "must be true or false")
        policy.enabled = body["enabled"]
    policy.selector, policy.modes = selector, modes
    if not selector.get("vms") and not selector.get("tag"):
        raise validation.invalid("vms", "a policy names VMs (vms) or a tag (tag)")


def _vm_names(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_LIMIT:
        raise validation.invalid("vms", f"must be a list of at most {MAX_LIMIT} VM names")
    return [validation.name(v, "vms") for v in value]


def _cron(value: Any, field: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_SCHEDULE or not croniter.is_valid(value):
        raise validation.invalid(field, "must be a cron expression like '0 3 * * *' (minute hour day month weekday)")
    return value


def _retention(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise validation.invalid("retention", f"must be an object with {', '.join(RETENTION_KEYS)}")
    validation.reject_unknown(value, set(RETENTION_KEYS))
    return {key: validation.integer(value[key], f"retention.{key}", 0, MAX_RETENTION) for key in value}
