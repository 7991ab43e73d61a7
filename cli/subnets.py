"""`laxcluster subnet list|create`: the networks VMs get their addresses from."""

import click

from cli.client import api
from cli.output import json_option, print_rows

COLUMNS = (
    ("name", lambda s: s["name"]),
    ("cidr", lambda s: s["cidr"]),
    ("gateway", lambda s: s["gateway"]),
    ("dns", lambda s: ", ".join(s["dns"])),
    ("range", lambda s: f"{s['range_start']}-{s['range_end']}"),
    ("MAC prefix", lambda s: s["mac_prefix"]),
)


@click.group("subnet")
def subnet() -> None:
    """Subnets and their leases (the network DB)."""


@subnet.command("list")
@json_option
def list_subnets(as_json: bool) -> None:
    """List subnets."""
    items = api().get("/subnets")["items"]
    print_rows(items, COLUMNS, as_json)


@subnet.command("create")
@click.argument("name")
@click.option("--cidr", required=True, help="the network, e.g. 10.40.0.0/24")
@click.option("--gateway", help="the default route given to VMs")
@click.option("--range", "address_range", required=True, metavar="START-END",
              help="the addresses to lease from, e.g. 10.40.0.10-10.40.0.200")
@click.option("--dns", multiple=True, help="a DNS server given to VMs (repeatable)")
@click.option("--mac-prefix", default="52:54:00", show_default=True,
              help="three octets: 52:54:00 for QEMU/KVM, 00:16:3e for Xen")
def create(name: str, cidr: str, gateway: str | None, address_range: str, dns: tuple[str, ...], mac_prefix: str) -> None:
    """Add a subnet to lease VM addresses from."""
    start, dash, end = address_range.partition("-")
    if not dash or not start or not end:
        raise click.BadParameter("expected START-END, e.g. 10.40.0.10-10.40.0.200", param_hint="--range")
    created = api().post("/subnets", {"name": name, "cidr": cidr, "gateway": gateway, "dns": list(dns),
                                      "range_start": start.strip(), "range_end": end.strip(), "mac_prefix": mac_prefix})
    click.echo(f"subnet {created['name']}: {created['cidr']}, leases {created['range_start']}-{created['range_end']}")
