"""`laxcluster vm install|list|show|start|shutdown|reboot|destroy|migrate|delete|console|disk`: virtual machines."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from cli.client import Client, api
from cli.console import console
from cli.output import json_option, print_fields, print_json, print_table
from cli.submitted import show_job, watch_option
from cli.volumes import VOLUME_COLUMNS
from cli.watch import human_bytes, watch_job

PAGE = 1000
COLUMNS = (
    ("name", lambda v: v["name"]),
    ("host", lambda v: v["host"]),
    ("id", lambda v: v["domain_id"]),
    ("memory", lambda v: human_bytes(v["memory_bytes"])),
    ("vCPUs", lambda v: v["vcpus"]),
    ("state", lambda v: v["state"]),
    ("CPU time", lambda v: None if v["cpu_time_ns"] is None else f"{v['cpu_time_ns'] / 1e9:.1f}s"),
    ("disk", lambda v: None if v["disk_bytes"] is None else human_bytes(v["disk_bytes"])),
    ("MAC", lambda v: v["mac"]),
    ("IP", lambda v: v["ip"]),
    ("template", lambda v: v["template"]),
    ("description", lambda v: v["description"]),
)


@click.group("vm")
def vm() -> None:
    """Virtual machines: install from a template, list, show, power actions, delete."""


@vm.command("install")
@click.argument("name")
@click.option("--template", required=True, help="the template to clone, e.g. tiny")
@click.option("--memory", required=True, help="e.g. 256M or 2G")
@click.option("--vcpus", required=True, type=click.IntRange(1, 64))
@click.option("--disk", required=True, help="the disk size, e.g. 1G (the template is grown to it)")
@click.option("--server", help="run it on this cluster server (default: where there is most room)")
@click.option("--subnet", help="lease its address in this subnet")
@click.option("--ssh-key", "ssh_key_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a file of OpenSSH public keys to let in (repeatable)")
@click.option("--description", default="", help="a note shown in the overview")
@click.option("--ha/--no-ha", default=True, help="restart it on another server when its server fails (default: yes)")
@click.option("--ha-priority", default=0, type=click.IntRange(0, 1000), help="higher restarts first when not all fit")
@watch_option
def install(name: str, template: str, memory: str, vcpus: int, disk: str, server: str | None, subnet: str | None,
            ssh_key_files: tuple[Path, ...], description: str, ha: bool, ha_priority: int, watch: bool) -> None:
    """Install VM NAME from a template, customized with its hostname, address and SSH keys, as a job."""
    body: dict[str, Any] = {"name": name, "template": template, "memory": memory, "vcpus": vcpus, "disk": disk,
                            "ssh_keys": [key for path in ssh_key_files for key in public_keys(path)],
                            "description": description, "ha": ha, "ha_priority": ha_priority}
    body.update({key: value for key, value in (("server", server), ("subnet", subnet)) if value is not None})
    client = api()
    show_job(client, client.post("/vms", body), watch)


def public_keys(path: Path) -> list[str]:
    """The key lines of an OpenSSH public key or authorized_keys file (blank lines and comments left out)."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@vm.command("list")
@click.option("--state", help="only VMs in this state, e.g. running or 'shut off'")
@json_option
def list_vms(state: str | None, as_json: bool) -> None:
    """The overview: active and inactive VMs, each with its server, resources, address and template."""
    active, inactive = [], []
    for page in pages(api(), state):
        active += page["active"]
        inactive += page["inactive"]
    if as_json:
        print_json({"active": active, "inactive": inactive})
        return
    click.echo("Active")
    print_table(active, COLUMNS)
    click.echo("Inactive")
    print_table(inactive, COLUMNS)


def pages(client: Client, state: str | None) -> Iterator[dict[str, Any]]:
    """Every page of GET /vms, following `next`."""
    after = None
    while True:
        page = client.get("/vms", limit=PAGE, after=after, state=state)
        yield page
        after = page["next"]
        if after is None:
            return


@vm.command("show")
@click.argument("name")
@json_option
def show(name: str, as_json: bool) -> None:
    """Show one VM with its volumes."""
    item = api().get(f"/vms/{name}")
    if as_json:
        print_json(item)
        return
    print_fields({key: value for key, value in item.items() if key != "volumes"})
    click.echo("volumes:")
    print_table(item["volumes"], VOLUME_COLUMNS)


def _power_command(action: str, help_text: str) -> click.Command:
    @click.argument("name")
    @watch_option
    def command(name: str, watch: bool) -> None:
        client = api()
        show_job(client, client.post(f"/vms/{name}/actions/{action}"), watch)

    return click.command(action, help=help_text)(command)


@vm.command("start")
@click.argument("name")
@click.option("--on-san", is_flag=True, help="run it on its SAN host, from its volumes, for maintenance when no server "
                                             "can (its exports are locked meanwhile; stop it with shutdown or destroy)")
@watch_option
def start(name: str, on_san: bool, watch: bool) -> None:
    """Start VM NAME on its server (or with --on-san on its SAN host), as a job."""
    client = api()
    show_job(client, client.post(f"/vms/{name}/actions/start", {"on_san": on_san}), watch)


for _action, _help in (("shutdown", "Ask VM NAME's guest to power off (ACPI), as a job."),
                       ("reboot", "Ask VM NAME's guest to reboot, as a job."),
                       ("destroy", "Power VM NAME off at once, like pulling the plug, as a job.")):
    vm.add_command(_power_command(_action, _help))


@vm.command("rescue")
@click.argument("name")
@click.option("--end", is_flag=True, help="leave the rescue system: the VM's own domain back, stopped")
@watch_option
def rescue(name: str, end: bool, watch: bool) -> None:
    """Boot stopped VM NAME into the rescue system with its disks attached (use `vm console`); as a job."""
    client = api()
    show_job(client, client.post(f"/vms/{name}/actions/rescue", {"end": end}), watch)


@vm.command("delete")
@click.argument("name")
@watch_option
def delete(name: str, watch: bool) -> None:
    """Delete VM NAME: stop it, remove its domain, volumes and export, release its address; as a job."""
    client = api()
    show_job(client, client.request("DELETE", f"/vms/{name}").json(), watch)


@vm.command("migrate")
@click.argument("name")
@click.option("--to", "to", help="the destination server (default: where there is most room)")
@click.option("--offline", is_flag=True, help="pause the VM while its memory moves instead of moving it live")
@click.option("--check", is_flag=True, help="only run the pre-flight checks and print what stands in the way")
@click.option("--bandwidth", type=click.IntRange(1, 100_000), help="cap the memory transfer at this many MiB/s")
@watch_option
def migrate(name: str, to: str | None, offline: bool, check: bool, bandwidth: int | None, watch: bool) -> None:
    """Move VM NAME to another server (live, unless --offline), as a job; its disks stay on the SAN."""
    body: dict[str, Any] = {"live": not offline, "check": check}
    body.update({key: value for key, value in (("to", to), ("bandwidth_mib_s", bandwidth)) if value is not None})
    client = api()
    job = client.post(f"/vms/{name}/actions/migrate", body)
    if check:
        watch_job(client, job["id"])
        show_problems(client.get(f"/jobs/{job['id']}")["result"])
        return
    show_job(client, job, watch)
    if watch:
        result = client.get(f"/jobs/{job['id']}")["result"]
        click.echo(f"{name} runs on {result['destination']}: downtime {result.get('downtime_ms')} ms, "
                   f"migration {result.get('migration_ms')} ms, job {result.get('total_ms')} ms")
        if result.get("paused_because"):
            click.echo(f"{name} was {result['paused_because']}")


def show_problems(result: dict[str, Any]) -> None:
    """Print a pre-flight's problems, one a line; exit 1 when there are any."""
    for problem in result["problems"]:
        click.echo(f"{problem['code']}: {problem['message']}")
    if result["problems"]:
        raise SystemExit(1)
    click.echo(f"no problems: {result['vm']} can move from {result['source']} to {result['destination']}")


vm.add_command(console)

DISK_COLUMNS = (
    ("id", lambda v: v["id"]),
    ("role", lambda v: v["role"]),
    ("label", lambda v: v["label"]),
    ("size", lambda v: human_bytes(v["size_bytes"])),
    ("LUN", lambda v: v["iscsi_lun"]),
    ("volume", lambda v: v["name"]),
)


@vm.group("disk")
def disk() -> None:
    """A VM's disks: its boot disk and data disks, named by volume id."""


@disk.command("add")
@click.argument("name")
@click.option("--size", required=True, help="the new disk's size, e.g. 10G")
@click.option("--label", help="a note shown with the disk ([a-z0-9-])")
@watch_option
def disk_add(name: str, size: str, label: str | None, watch: bool) -> None:
    """Add a data disk to VM NAME: hot-plugged if it runs, else attached at its next start; as a job."""
    body = {"size": size} | ({"label": label} if label is not None else {})
    client = api()
    job = client.post(f"/vms/{name}/disks", body)
    show_job(client, job, watch)
    if watch:
        result = client.get(f"/jobs/{job['id']}")["result"]
        click.echo(f"disk {result['disk']} (LUN {result['lun']}) attached {result['attached']}")


@disk.command("list")
@click.argument("name")
@json_option
def disk_list(name: str, as_json: bool) -> None:
    """VM NAME's disks, in LUN order."""
    items = api().get(f"/vms/{name}/disks")["items"]
    if as_json:
        print_json(items)
        return
    print_table(items, DISK_COLUMNS)


@disk.command("remove")
@click.argument("name")
@click.argument("disk_id", type=int)
@watch_option
def disk_remove(name: str, disk_id: int, watch: bool) -> None:
    """Detach data disk DISK_ID (a volume id) from VM NAME and delete it, as a job; the boot disk is refused."""
    client = api()
    show_job(client, client.request("DELETE", f"/vms/{name}/disks/{disk_id}").json(), watch)
