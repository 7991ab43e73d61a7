"""The `laxcluster` command."""

import click

from cli.client import Settings
from cli.jobs import jobs
from cli.lab import lab
from cli.servers import servers
from cli.tokens import token


@click.group()
@click.option("--url", envvar="LAXCLUSTER_URL", metavar="URL",
              help="the API, e.g. http://127.0.0.1:8080 (default: [api] host and port of the config) [env LAXCLUSTER_URL]")
@click.option("--token", envvar="LAXCLUSTER_TOKEN", metavar="TOKEN",
              help="API token (laxcluster token create) [env LAXCLUSTER_TOKEN]")
@click.pass_context
def cli(ctx: click.Context, url: str | None, token: str | None) -> None:
    """LaxCluster: a manager for virtualization clusters."""
    ctx.obj = Settings(url=url, token=token)


cli.add_command(lab)
cli.add_command(token)
cli.add_command(servers)
cli.add_command(jobs)
