"""`laxcluster backup create|list|show|verify|restore`, `store list|create` and `policy list|create|edit`."""

from typing import Any

import click

from cli.client import api
from cli.output import json_option, print_fields, print_item, print_rows
from cli.submitted import show_job, watch_option
from cli.watch import human_bytes

BACKUP_COLUMNS = (
    ("id", lambda b: b["id"]),
    ("vm", lambda b: b["vm"]),
    ("volume", lambda b: b["volume"]),
    ("mode", lambda b: b["mode"]),
    ("state", lambda b: b["state"]),
    ("size", lambda b: human_bytes(b["size_bytes"])),
    ("read", lambda b: human_bytes(b["bytes_read"])),
    ("stored", lambda b: human_bytes(b["stored_bytes"])),
    ("store", lambda b: b["store"]),
    ("parent", lambda b: b["parent"]),
    ("created", lambda b: b["created_at"]),
)
RETENTION_OPTIONS = {"keep_last": "keep_last", "keep_daily": "daily", "keep_weekly": "weekly", "keep_monthly": "monthly"}
STORE_COLUMNS = (
    ("name", lambda s: s["name"]),
    ("kind", lambda s: s["kind"]),
    ("location", lambda s: s["location"]),
    ("credentials", lambda s: "yes" if s["has_credentials"] else "no"),
)
POLICY_COLUMNS = (
    ("name", lambda p: p["name"]),
    ("vms", lambda p: ", ".join(p["vms"]) or None),
    ("tag", lambda p: p["tag"]),
    ("schedule", lambda p: p["schedule"]),
    ("mode", lambda p: p["mode"]),
    ("full on", lambda p: p["full_schedule"]),
    ("store", lambda p: p["store"]),
    ("keep", lambda p: ", ".join(f"{k} {v}" for k, v in p["retention"].items() if v) or "all"),
    ("enabled", lambda p: "yes" if p["enabled"] else "no"),
    ("last run", lambda p: p["last_run_at"]),
)


@click.group("backup")
def backup() -> None:
    """Backups of VMs: create (full or differential), list, show, verify, restore."""


@backup.command("create")
@click.argument("vm")
@click.option("--diff", is_flag=True, help="only what changed since the VM's last backup in the store")
@click.option("--store", help="the store to write to (default: the only one)")
@watch_option
def create(vm: str, diff: bool, store: str | None, watch: bool) -> None:
    """Back up VM from snapshots of its disks while it keeps running, as a job."""
    body: dict[str, Any] = {"mode": "diff" if diff else "full"}
    if store:
        body["store"] = store
    client = api()
    show_job(client, client.post(f"/vms/{vm}/backups", body), watch)


@backup.command("list")
@click.argument("vm", required=False)
@click.option("--store", help="only backups in this store")
@json_option
def list_backups(vm: str | None, store: str | None, as_json: bool) -> None:
    """Backups, newest first (of one VM if given), with their size, bytes read and bytes stored."""
    print_rows(api().get("/backups", vm=vm, store=store)["items"], BACKUP_COLUMNS, as_json)


@backup.command("show")
@click.argument("backup_id")
@json_option
def show(backup_id: str, as_json: bool) -> None:
    """Show one backup."""
    print_item(api().get(f"/backups/{backup_id}"), as_json)


@backup.command("verify")
@click.argument("backup_id")
@click.option("--boot", is_flag=True, help="then restore it as a scratch VM, boot it and report whether it came up")
@watch_option
def verify(backup_id: str, boot: bool, watch: bool) -> None:
    """Re-read and re-hash every chunk of a backup, as a job; a bad chunk fails it and marks the backup corrupt."""
    client = api()
    show_job(client, client.post(f"/backups/{backup_id}/actions/verify", {"boot": boot}), watch)


@backup.command("restore")
@click.argument("backup_id")
@click.option("--as", "as_vm", metavar="NEWVM", help="restore as a new VM like the backed-up one, with its own lease")
@click.option("--to-volume", help="restore to a new volume of this name (the default, named <volume>-r<backup>)")
@click.option("--in-place", is_flag=True, help="overwrite the VM's own disk (the VM must be stopped)")
@watch_option
def restore(backup_id: str, as_vm: str | None, to_volume: str | None, in_place: bool, watch: bool) -> None:
    """Restore a backup bit for bit: to a new volume, as a new VM, or in place onto its stopped VM's disk, as a job."""
    if sum((in_place, as_vm is not None, to_volume is not None)) > 1:
        raise click.UsageError("--as, --to-volume and --in-place exclude each other")
    body: dict[str, Any] = {"as_vm": as_vm} if as_vm else {"in_place": in_place}
    if to_volume:
        body["as"] = to_volume
    client = api()
    show_job(client, client.post(f"/backups/{backup_id}/actions/restore", body), watch)


@click.group("store")
def store() -> None:
    """Backup stores: a directory on the SAN host, or one on another host over SSH."""


@store.command("list")
@json_option
def list_stores(as_json: bool) -> None:
    """Backup stores (credentials are never shown)."""
    print_rows(api().get("/stores")["items"], STORE_COLUMNS, as_json)


@store.command("create")
@click.argument("name")
@click.option("--kind", type=click.Choice(["local", "ssh"]), default="local", show_default=True)
@click.option("--location", required=True, help="local: /path on the SAN host; ssh: user@host:/path")
@click.option("--key-file", type=click.File("r"), help="ssh: the private key the SAN logs in with")
def create_store(name: str, kind: str, location: str, key_file: Any) -> None:
    """Add backup store NAME."""
    body: dict[str, Any] = {"name": name, "kind": kind, "location": location}
    if key_file is not None:
        body["credentials"] = {"private_key": key_file.read()}
    made = api().post("/stores", body)
    click.echo(f"store {made['name']}: {made['kind']} {made['location']}")


@click.group("policy")
def policy() -> None:
    """Backup policies: which VMs, when (cron, UTC), full or differential, where, and how many to keep."""


def policy_options(command: Any) -> Any:
    """The options `policy create` and `policy edit` share; unset ones are left out of the request."""
    options = [
        click.option("--vm", "vms", multiple=True, help="a VM to back up (repeatable)"),
        click.option("--tag", help="back up every VM with this tag"),
        click.option("--schedule", help="cron expression (UTC), e.g. '0 3 * * *'"),
        click.option("--mode", type=click.Choice(["full", "diff"]), help="what a run makes"),
        click.option("--full-schedule", help="cron expression: runs due on it are full, e.g. '0 3 * * 0'"),
        click.option("--store", help="the store to write to"),
        click.option("--keep-last", type=click.IntRange(0), help="keep the newest N backups"),
        click.option("--keep-daily", type=click.IntRange(0), help="keep the newest of each of the last N days"),
        click.option("--keep-weekly", type=click.IntRange(0), help="keep the newest of each of the last N weeks"),
        click.option("--keep-monthly", type=click.IntRange(0), help="keep the newest of each of the last N months"),
        click.option("--enabled/--disabled", default=None, help="whether the scheduler runs it"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def policy_body(options: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {key: options[key] for key in ("tag", "schedule", "mode", "full_schedule", "store", "enabled")
                            if options[key] is not None}
    if options["vms"]:
        body["vms"] = list(options["vms"])
    retention = {field: options[option] for option, field in RETENTION_OPTIONS.items() if options[option] is not None}
    if retention:
        body["retention"] = retention
    return body


@policy.command("list")
@json_option
def list_policies(as_json: bool) -> None:
    """Backup policies."""
    print_rows(api().get("/policies")["items"], POLICY_COLUMNS, as_json)


@policy.command("create")
@click.argument("name")
@policy_options
def create_policy(name: str, **options: Any) -> None:
    """Add backup policy NAME; the scheduler runs it from its next due time."""
    made = api().post("/policies", {"name": name, **policy_body(options)})
    click.echo(f"policy {made['name']}: {made['mode']} at '{made['schedule']}' to {made['store']}")


@policy.command("edit")
@click.argument("name")
@policy_options
def edit_policy(name: str, **options: Any) -> None:
    """Change backup policy NAME (only the options given)."""
    body = policy_body(options)
    if not body:
        raise click.UsageError("nothing to change: give at least one option")
    changed = api().request("PATCH", f"/policies/{name}", json=body).json()
    print_fields(changed)
