"""`laxcluster audit`: the audit trail, newest first (an admin's command)."""

import json

import click

from cli.client import api
from cli.output import json_option, print_rows

COLUMNS = (
    ("id", lambda e: e["id"]),
    ("at", lambda e: e["at"]),
    ("actor", lambda e: e["actor"]),
    ("action", lambda e: e["action"]),
    ("target", lambda e: e["target"]),
    ("from", lambda e: e["source_ip"]),
    ("details", lambda e: json.dumps(e["details"], separators=(",", ":")) if e["details"] else ""),
)


@click.command("audit")
@click.option("--actor", help="only events by this actor (a token's name, or local:<user>)")
@click.option("--action", help="only this action, e.g. job.install-vm, token.revoke")
@click.option("--target", help="only events on this target, e.g. vm/web1, token/3")
@click.option("--since", metavar="WHEN", help="only events since an ISO 8601 time or a duration back, e.g. 24h, 7d")
@click.option("--before", type=click.IntRange(min=1), metavar="ID", help="only events older than event ID (the next page)")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@json_option
def audit(actor: str | None, action: str | None, target: str | None, since: str | None, before: int | None,
          limit: int, as_json: bool) -> None:
    """Who changed what, when and from where, newest first."""
    page = api().get("/audit", actor=actor, action=action, target=target, since=since, before=before, limit=limit)
    print_rows(page["items"], COLUMNS, as_json)
    if page["next_before"] is not None and not as_json:
        click.echo(f"older events: --before {page['next_before']}", err=True)
