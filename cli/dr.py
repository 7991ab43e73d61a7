"""`laxcluster dr enable|status|disable|failover|failback|drill`: replication to the other site and its use."""

from typing import Any

import click

from cli.client import api
from cli.output import json_option, print_item, print_rows
from cli.submitted import show_job, watch_option
from cli.watch import human_bytes

STATUS_COLUMNS = (
    ("vm", lambda r: r["vm"]),
    ("state", lambda r: r["state"]),
    ("primary", lambda r: r["primary_site"]),
    ("peer", lambda r: r["peer_san"]),
    ("mode", lambda r: r["schedule"] or r["mode"]),
    ("newest replica", lambda r: r["newest_point_at"]),
    ("rpo", lambda r: None if r["rpo_s"] is None else f"{r['rpo_s']:.0f}s"),
    ("target", lambda r: f"{r['rpo_target_s']}s"),
    ("behind", lambda r: human_bytes(r["bytes_behind"])),
    ("rate", lambda r: f"{human_bytes(r['rate_bytes_s'])}/s"),
    ("points", lambda r: len(r["points"])),
    ("gen", lambda r: r["generation"]),
)


@click.group("dr")
def dr() -> None:
    """Disaster recovery: replicate VMs to the other site's SAN, fail over, fail back, drill."""


@dr.command("enable")
@click.argument("vm")
@click.option("--site", help="the DR site (default: the only other site)")
@click.option("--schedule", help="ship on this cron line (UTC) instead of continuously")
@click.option("--rpo", "rpo_target_s", type=int, default=60, show_default=True,
              help="seconds: an older newest replica puts the replication in alert")
@click.option("--bandwidth", help="cap the link, bytes per second (e.g. 20M)")
@click.option("--keep", type=int, default=3, show_default=True, help="replica points kept at the DR site")
@watch_option
def enable(vm: str, site: str | None, schedule: str | None, rpo_target_s: int, bandwidth: str | None, keep: int,
           watch: bool) -> None:
    """Replicate VM's disks to the DR site, starting with a full ship (a job)."""
    body: dict[str, Any] = {"mode": "scheduled" if schedule else "continuous", "rpo_target_s": rpo_target_s,
                            "keep": keep}
    body.update({k: v for k, v in (("site", site), ("schedule", schedule), ("bandwidth_limit", bandwidth)) if v})
    client = api()
    show_job(client, client.post(f"/vms/{vm}/replication", body), watch)


@dr.command("status")
@click.argument("vm", required=False)
@json_option
def status(vm: str | None, as_json: bool) -> None:
    """Each replicated VM: newest consistent replica, RPO against its target, bytes behind, rate (one VM: in full)."""
    if vm:
        print_item(api().get(f"/vms/{vm}/replication"), as_json)
    else:
        print_rows(api().get("/replications"), STATUS_COLUMNS, as_json)


@dr.command("disable")
@click.argument("vm")
@watch_option
def disable(vm: str, watch: bool) -> None:
    """Stop replicating VM and drop its replica points (a job)."""
    client = api()
    show_job(client, client.request("DELETE", f"/vms/{vm}/replication").json(), watch)


@dr.command("failover")
@click.argument("vm")
@click.option("--unplanned", is_flag=True, help="the primary site is gone: start from a replica point at once")
@click.option("--point", help="unplanned: the replica point to start from (default: the newest)")
@click.option("--server", help="the DR site's server to start it on")
@watch_option
def failover(vm: str, unplanned: bool, point: str | None, server: str | None, watch: bool) -> None:
    """Run VM at its DR site: planned (stop, last sync, switch; nothing lost) or --unplanned."""
    body: dict[str, Any] = {"planned": not unplanned}
    body.update({k: v for k, v in (("point", point), ("server", server)) if v})
    client = api()
    show_job(client, client.post(f"/vms/{vm}/failover", body), watch)


@dr.command("failback")
@click.argument("vm")
@click.option("--server", help="the home site's server to start it on")
@watch_option
def failback(vm: str, server: str | None, watch: bool) -> None:
    """Bring VM home: ship only what changed at the DR site since the failover, then switch back."""
    client = api()
    show_job(client, client.post(f"/vms/{vm}/failback", {"server": server} if server else {}), watch)


@dr.command("drill")
@click.argument("vm")
@click.option("--point", help="the replica point to boot (default: the newest)")
@click.option("--server", help="the DR site's server to boot it on")
@watch_option
def drill(vm: str, point: str | None, server: str | None, watch: bool) -> None:
    """Boot a replica of VM at the DR site with no network, check it comes up, tear it down."""
    body = {k: v for k, v in (("point", point), ("server", server)) if v}
    client = api()
    show_job(client, client.post(f"/vms/{vm}/drill", body), watch)
