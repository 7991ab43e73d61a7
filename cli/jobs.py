"""`laxcluster jobs list|show|cancel|watch`: the jobs the API has run or is running."""

import click

from cli.client import api
from cli.output import json_option, print_item, print_rows
from cli.watch import watch_job

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
COLUMNS = (
    ("id", lambda j: j["id"]),
    ("kind", lambda j: j["kind"]),
    ("target", lambda j: j["target"]),
    ("state", lambda j: j["state"]),
    ("progress", lambda j: f"{j['progress']:.0f}%"),
    ("phase", lambda j: j["phase"]),
    ("error", lambda j: j["error"] and j["error"]["code"]),
    ("by", lambda j: j["requested_by"]),
    ("created", lambda j: j["created_at"]),
)


@click.group("jobs")
def jobs() -> None:
    """Jobs: every change LaxCluster makes runs as one."""


@jobs.command("list")
@click.option("--kind", help="only jobs of this kind (e.g. refresh-servers)")
@click.option("--target", help="only jobs on this target (e.g. servers, server/cs1)")
@click.option("--state", type=click.Choice(STATES))
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@json_option
def list_jobs(kind: str | None, target: str | None, state: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    items = api().get("/jobs", kind=kind, target=target, state=state, limit=limit)["items"]
    print_rows(items, COLUMNS, as_json)


@jobs.command("show")
@click.argument("job_id")
@json_option
def show(job_id: str, as_json: bool) -> None:
    """Show one job."""
    job = api().get(f"/jobs/{job_id}")
    print_item(job, as_json)


@jobs.command("cancel")
@click.argument("job_id")
@click.option("--force", is_flag=True, help="admins: end a stuck job now (no worker runs it); its cleanup does not run")
def cancel(job_id: str, force: bool) -> None:
    """Cancel a job: a queued one never starts, a running one stops at its next check."""
    job = api().post(f"/jobs/{job_id}/{'force-cancel' if force else 'cancel'}")
    click.echo(f"job {job['id']}: {job['state']}" + (" (cancel requested)" if job["state"] == "running" else ""))


@jobs.command("watch")
@click.argument("job_id")
def watch(job_id: str) -> None:
    """Follow a job live until it ends; exit 1 if it failed, 3 if it was cancelled."""
    final = watch_job(api(), job_id)
    click.echo(f"job {job_id}: {final['state']}")
