"""The `laxcluster` command."""

import click

from cli.audit import audit
from cli.backups import backup, policy, store
from cli.check import check
from cli.client import Settings
from cli.db import db
from cli.dr import dr
from cli.jobs import jobs
from cli.lab import lab
from cli.servers import servers
from cli.subnets import subnet
from cli.templates import template
from cli.run import run
from cli.tokens import token
from cli.vms import vm
from cli.volumes import san, volume


@click.group()
@click.option("--url", envvar="LAXCLUSTER_URL", metavar="URL",
              help="the API, e.g. http://127.0.0.1:8080 (default: [api] host and port of the config) [env LAXCLUSTER_URL]")
@click.option("--token", envvar="LAXCLUSTER_TOKEN", metavar="TOKEN",
              help="API token (laxcluster token create) [env LAXCLUSTER_TOKEN]")
@click.pass_context
def cli(ctx: click.Context, url: str | None, token: str | None) -> None:
    """LaxCluster: a manager for virtualization clusters."""
    ctx.obj = Settings(url=url, token=token)


cli.add_command(run)
cli.add_command(lab)
cli.add_command(token)
cli.add_command(servers)
cli.add_command(servers, name="server")
cli.add_command(jobs)
cli.add_command(vm)
cli.add_command(template)
cli.add_command(subnet)
cli.add_command(volume)
cli.add_command(san)
cli.add_command(backup)
cli.add_command(store)
cli.add_command(policy)
cli.add_command(check)
cli.add_command(audit)
cli.add_command(db)
cli.add_command(dr)
