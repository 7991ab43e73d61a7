"""`laxcluster check [--repair] [--json]`: compare the inventory with the cluster and list every drift.

Exit status: 0 when nothing is left to repair, 1 when drift remains (or the check job failed), so
scripts and the fault suite can use it as their oracle.
"""

import click
from rich.console import Console

from cli.client import api
from cli.output import json_option, print_json, print_table
from cli.watch import watch_job

EXIT_DRIFT = 1
COLUMNS = (
    ("kind", lambda d: d["kind"]),
    ("resource", lambda d: d["resource"]),
    ("where", lambda d: d["where"]),
    ("what", lambda d: d["what"]),
    ("detail", lambda d: d["detail"]),
    ("repair", lambda d: "repaired" if d.get("repaired") else d["repair"]),
)


@click.command("check")
@click.option("--repair", is_flag=True, help="also repair every drift that is safe to repair")
@json_option
@click.pass_context
def check(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Compare the inventory with every SAN, tgtd and libvirtd, and list the drift with the command that repairs it."""
    client = api()
    job = client.post("/check", {"repair": repair})
    # With --json, stdout carries only the report: the progress bar goes to stderr.
    watch_job(client, job["id"], console=Console(stderr=True) if as_json else None)
    report = client.get(f"/jobs/{job['id']}")["result"]
    if as_json:
        print_json(report)
    else:
        _print_report(report)
    if not report["clean"]:
        ctx.exit(EXIT_DRIFT)


def _print_report(report: dict) -> None:
    repaired = {_key(d) for d in report["repaired"]}
    rows = [{**d, "repaired": _key(d) in repaired} for d in report["drifts"]]
    if rows:
        print_table(rows, COLUMNS)
    left = len(rows) - len(repaired)
    click.echo(f"{len(rows)} drift(s), {len(repaired)} repaired, {left} left"
               + (f"; {len(report['busy'])} skipped while jobs work on them" if report["busy"] else ""))
    for failed in report["repair_failed"]:
        click.echo(f"repair of {failed['resource']} {failed['what']} on {failed['where']} failed: {failed['error']}", err=True)


def _key(drift: dict) -> tuple:
    return drift["kind"], drift["resource"], drift["where"], drift["what"]
