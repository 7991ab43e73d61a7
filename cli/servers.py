"""`laxcluster servers list|refresh|evacuate|fence|activate` (also `laxcluster server …`): the cluster servers."""

import click

from cli.client import api
from cli.output import json_option, print_rows
from cli.submitted import show_job, watch_option
from cli.watch import human_bytes, watch_job

COLUMNS = (
    ("name", lambda s: s["name"]),
    ("cluster", lambda s: s["cluster"]),
    ("reachable", lambda s: {True: "yes", False: "no", None: "?"}[s["reachable"]]),
    ("cpus", lambda s: s["cpu_count"]),
    ("cpu model", lambda s: s["cpu_model"]),
    ("MHz", lambda s: s["cpu_mhz"]),
    ("memory", lambda s: s["memory_total_bytes"] and human_bytes(s["memory_total_bytes"])),
    ("free", lambda s: s["memory_free_bytes"] and human_bytes(s["memory_free_bytes"])),
    ("kind", lambda s: s["hypervisor"]),
    ("hypervisor", lambda s: s["hypervisor_type"] and f"{s['hypervisor_type']} {s['hypervisor_version'] or ''}".strip()),
    ("facts from", lambda s: s["facts_updated_at"]),
)


@click.group("servers")
def servers() -> None:
    """Cluster servers (hypervisor hosts)."""


@servers.command("list")
@json_option
def list_servers(as_json: bool) -> None:
    """List cluster servers with their last known facts."""
    items = api().get("/servers")["items"]
    print_rows(items, COLUMNS, as_json)


@servers.command("refresh")
@click.option("--watch", is_flag=True, help="follow the job live; exit non-zero unless it succeeds")
@click.option("--idempotency-key", help="retrying with the same key returns the same job instead of a second one")
def refresh(watch: bool, idempotency_key: str | None) -> None:
    """Read every server's facts (CPU, memory, hypervisor) through libvirt, as a job."""
    client = api()
    job = client.post("/servers/refresh", idempotency_key=idempotency_key)
    click.echo(f"job {job['id']}: {job['state']}")
    if watch:
        final = watch_job(client, job["id"])
        click.echo(f"job {job['id']}: {final['state']}")


@servers.command("evacuate")
@click.argument("name")
@watch_option
def evacuate(name: str, watch: bool) -> None:
    """Put server NAME into maintenance and migrate every VM on it elsewhere, as a job."""
    _server_action(name, "evacuate", watch)


@servers.command("activate")
@click.argument("name")
@watch_option
def activate(name: str, watch: bool) -> None:
    """End server NAME's maintenance, as a job: new VMs and migrations may use it again (a fenced server first
    loses its stale domains and is let back into its site's targets)."""
    _server_action(name, "activate", watch)


@servers.command("fence")
@click.argument("name")
@watch_option
def fence(name: str, watch: bool) -> None:
    """Fence server NAME at its site's SAN, as a job: nothing on it can reach a VM disk until it is activated."""
    _server_action(name, "fence", watch)


def _server_action(name: str, action: str, watch: bool) -> None:
    client = api()
    show_job(client, client.post(f"/servers/{name}/actions/{action}"), watch)
