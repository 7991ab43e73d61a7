"""What every job-making command does with the job the API answered: print it, and follow it with --watch."""

from typing import Any

import click

from cli.client import Client
from cli.watch import watch_job

watch_option = click.option("--watch", is_flag=True, help="follow the job live; exit non-zero unless it succeeds")


def show_job(client: Client, job: dict[str, Any], watch: bool) -> None:
    """Print `job <id>: <state>`; with `watch`, follow it to its end (JobDidNotSucceed exits non-zero)."""
    click.echo(f"job {job['id']}: {job['state']} ({job['kind']} {job['target']})")
    if watch:
        final = watch_job(client, job["id"])
        click.echo(f"job {job['id']}: {final['state']}")
