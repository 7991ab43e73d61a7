"""`laxcluster san list|volumes|refresh` and `laxcluster volume show|resize`: the SANs and the disks on them."""

import click

from cli.client import api
from cli.output import json_option, print_item, print_rows
from cli.submitted import show_job, watch_option
from cli.watch import human_bytes


def _bytes(count: int | None) -> str | None:
    return None if count is None else human_bytes(count)


SAN_COLUMNS = (
    ("name", lambda s: s["name"]),
    ("site", lambda s: s["site"]),
    ("backend", lambda s: s["backend"]),
    ("portal", lambda s: s["portal"]),
    ("pool size", lambda s: _bytes(s["pool_size_bytes"])),
    ("used", lambda s: _bytes(s["pool_used_bytes"])),
    ("free", lambda s: _bytes(s["pool_free_bytes"])),
    ("reflink", lambda s: {True: "yes", False: "no", None: "?"}[s["reflink"]]),
)
VOLUME_COLUMNS = (
    ("id", lambda v: v["id"]),
    ("name", lambda v: v["name"]),
    ("VM", lambda v: v["vm"]),
    ("role", lambda v: v["role"]),
    ("size", lambda v: human_bytes(v["size_bytes"])),
    ("iSCSI target", lambda v: v["iscsi_target"]),
    ("LUN", lambda v: v["iscsi_lun"]),
)


@click.group("san")
def san() -> None:
    """SANs: storage servers holding every VM disk."""


@san.command("list")
@json_option
def list_sans(as_json: bool) -> None:
    """List SANs with their pool's size and free space (as of their last refresh)."""
    items = api().get("/sans")["items"]
    print_rows(items, SAN_COLUMNS, as_json)


@san.command("volumes")
@click.argument("name")
@json_option
def san_volumes(name: str, as_json: bool) -> None:
    """List the volumes on SAN NAME."""
    items = api().get(f"/sans/{name}/volumes")["items"]
    print_rows(items, VOLUME_COLUMNS, as_json)


@san.command("refresh")
@click.argument("name")
@watch_option
def refresh(name: str, watch: bool) -> None:
    """Read SAN NAME's pool facts again, as a job."""
    client = api()
    show_job(client, client.post(f"/sans/{name}/refresh"), watch)


@click.group("volume")
def volume() -> None:
    """Volumes: VM disks on a SAN."""


@volume.command("show")
@click.argument("volume_id", type=int)
@json_option
def show(volume_id: int, as_json: bool) -> None:
    """Show one volume."""
    item = api().get(f"/volumes/{volume_id}")
    print_item(item, as_json)


@volume.command("resize")
@click.argument("volume_id", type=int)
@click.argument("size")
@watch_option
def resize(volume_id: int, size: str, watch: bool) -> None:
    """Grow volume VOLUME_ID to SIZE (e.g. 4G), or shrink it safely while its VM is stopped, as a job."""
    client = api()
    show_job(client, client.post(f"/volumes/{volume_id}/actions/resize", {"size": size}), watch)
