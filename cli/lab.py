"""`laxcluster lab up|down|status`: the whole two-site lab on this machine."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

import config
from errors import LaxError
from lab import cluster


@click.group()
def lab() -> None:
    """The lab: a two-site cluster of namespaces, libvirtds and tgtds on this machine (needs root)."""


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def up(as_json: bool) -> None:
    """Build whatever of the lab is missing and wait until every daemon answers (harmless if it runs)."""
    cfg = config.load()
    try:
        report = cluster.up(cfg)
    except LaxError as error:
        raise click.ClickException(f"{error.message}\n(`laxcluster lab down` cleans up a half-made lab)") from error
    _print(report, as_json)


@lab.command()
def down() -> None:
    """Stop every lab daemon and remove its namespaces, bridges, mounts and loop devices (keeps var/lab data)."""
    cfg = config.load()
    try:
        cluster.down(cfg)
    except LaxError as error:
        raise click.ClickException(error.message) from error
    click.echo("lab is down")


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(as_json: bool) -> None:
    """Every lab host with its namespace, addresses and daemons (PID, answering?). Exit 1 unless all is up."""
    report = cluster.status(config.load())
    _print(report, as_json)
    sys.exit(0 if report["up"] else 1)


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"lab {report['prefix']} ({report['lab_dir']}): {'up' if report['up'] else 'NOT fully up'}")
    for net in report["networks"]:
        click.echo(f"  network {net['name']:8} {net['cidr']:18} bridge {net['bridge']} {'' if net['present'] else '(missing)'}")
    for net in report.get("vm_networks", []):
        dhcp = net["dhcp"]
        served = f"dnsmasq pid {dhcp['pid']}" if dhcp["pid"] else ("NO dnsmasq" if not dhcp["answers"] else "no DHCP")
        click.echo(f"  vm net  {net['name']:8} {net['cidr']:18} bridge {net['bridge']} {'' if net['present'] else '(missing)'} "
                   f"subnet {net['subnet']}, {served}")
    for host in report["hosts"]:
        addresses = " ".join(f"{net}={addr}" for net, addr in host["addresses"].items())
        missing = "" if host["netns_present"] else " (namespace missing)"
        click.echo(f"  {host['kind']:6} {host['name']:6} netns {host['netns']}{missing}  {addresses}")
        for daemon in host["daemons"]:
            click.echo(f"           {daemon['name']:10} pid {daemon['pid'] or '-':>7}  {'answers' if daemon['answers'] else 'NOT answering'}")
        if "pool" in host:
            pool = host["pool"]
            click.echo(f"           pool       {pool['mountpoint']} {'mounted on ' + pool['loop'] if pool['mounted'] else 'NOT mounted'}")
