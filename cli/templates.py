"""`laxcluster template list|import|build`: the images new VMs are cloned from."""

import os

import click

import config
from cli.bootstrap import run_jobs, template_imports
from cli.client import api
from cli.output import json_option, print_rows
from cli.submitted import show_job, watch_option
from cli.watch import human_bytes
from lab.debian import build_debian
from models import SUCCEEDED

COLUMNS = (
    ("name", lambda t: t["name"]),
    ("SAN", lambda t: t["san"]),
    ("site", lambda t: t["site"]),
    ("OS", lambda t: t["os"]),
    ("default size", lambda t: human_bytes(t["default_size_bytes"])),
    ("boot", lambda t: "direct" if t["direct_boot"] else "disk"),
    ("customization", lambda t: t["customization"]),
)


@click.group("template")
def template() -> None:
    """Templates: read-only volumes on a SAN that VMs are installed from."""


@template.command("list")
@click.option("--san", help="only the templates on this SAN")
@json_option
def list_templates(san: str | None, as_json: bool) -> None:
    """List templates."""
    items = api().get("/templates", san=san)["items"]
    print_rows(items, COLUMNS, as_json)


@template.command("import")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--san", required=True, help="the SAN to keep it on; FILE is read there")
@click.option("--format", "image_format", type=click.Choice(["raw", "qcow2"]),
              help="the image's format (default: qcow2 for a FILE ending in .qcow2, else raw)")
@click.option("--os", "os_name", default="linux", show_default=True, help="what the image runs, e.g. debian12")
@click.option("--default-size", help="the disk size VMs get unless they ask, e.g. 2G (default: the image's)")
@watch_option
def import_template(name: str, file: str, san: str, image_format: str | None, os_name: str, default_size: str | None,
                    watch: bool) -> None:
    """Import a raw or qcow2 image FILE as template NAME, as a job (admin). FILE is a regular file in the SAN
    host's import directory (templates.import_dir)."""
    image_format = image_format or ("qcow2" if file.endswith(".qcow2") else "raw")
    body = {"name": name, "san": san, "source_path": os.path.abspath(file), "format": image_format, "os": os_name}
    if default_size is not None:
        body["default_size"] = default_size
    client = api()
    show_job(client, client.post("/templates", body), watch)


BUILDERS = ("debian",)


@template.command("build")
@click.argument("name", type=click.Choice(BUILDERS))
def build_template(name: str) -> None:
    """Build template NAME on this host (the SAN host of the embedded cluster) and register it on every SAN
    that lacks it. `debian`: Debian 12 with cloud-init and SSH by debootstrap, cached under the import
    directory, so only the first build takes minutes."""
    cfg = config.load()
    click.echo(f"building {name} under {cfg.import_dir / name} (debootstrap from apt's Debian archive) ...")
    built = build_debian(cfg.import_dir / name)
    jobs = run_jobs(cfg, template_imports(cfg, name, built.disk, built.boot_info(), "debian12"))
    for job in jobs:
        click.echo(f"  {job.kind} {job.target}: {job.state}" + (f" ({job.error_message})" if job.error_message else ""))
    if any(job.state != SUCCEEDED for job in jobs):
        raise SystemExit(1)
    click.echo(f"template {name} is on every SAN")
