"""`laxcluster run`: the whole embedded LaxCluster in the foreground, stopped cleanly by Ctrl-C.

One launcher per var_dir: it holds <var_dir>/run/launcher.lock for its life and records there what it
starts, so that a start after a launcher that died stops what that one left running first.
"""

import os
from pathlib import Path

import click
import redis
import requests

import config
from cli.bootstrap import first_jobs, lab_backup_stores
from cli.procs import stop_groups
from cli.runrecord import RUN_DIR, RunRecord, launcher_lock
from cli.services import (STOP_GRACE_S, StopRequested, Supervisor, api_service, celery_services, flower_password,
                          redis_service)
from errors import LaxError
from lab import cluster as lab_cluster
from lab.processes import wait_until
from models.db import make_engine, make_session_factory, migrate, transaction
from tasks.inventory.config_sync import sync_from_config
from tasks.inventory.vmnet import publish_all

READY_TIMEOUT_S = 90


@click.command()
@click.option("--lab/--no-lab", "with_lab", default=True, show_default=True,
              help="Bring the lab cluster up first (and down again on exit).")
def run(with_lab: bool) -> None:
    """Start Redis, migrations, the lab, a worker per queue, beat, Flower and the API; Ctrl-C stops all."""
    cfg = config.load()
    run_dir = cfg.var_dir / RUN_DIR
    try:
        with launcher_lock(run_dir):
            stop_leftovers(cfg, run_dir)
            serve(cfg, RunRecord.begin(run_dir), with_lab)
    except LaxError as error:
        raise click.ClickException(error.message) from error


def stop_leftovers(cfg: config.Config, run_dir: Path) -> None:
    """Stop what a launcher that died left running, as its record says, and forget the record."""
    record = RunRecord.load(run_dir)
    if record is None:
        return
    leftovers = record.leftovers()
    if leftovers:
        click.echo(f"stopping what launcher pid {record.launcher.pid} left running: {', '.join(s.name for s in leftovers)}")
        stop_groups([service.pid for service in leftovers], STOP_GRACE_S)
    if record.lab:
        click.echo("taking down the lab it left up")
        lab_cluster.down(cfg)
    record.remove()


def serve(cfg: config.Config, record: RunRecord, with_lab: bool) -> None:
    """Start everything and run until a stop signal or a service exits; then, or on any failure, stop everything."""
    supervisor = Supervisor(dict(os.environ, LAXCLUSTER_CONFIG=str(cfg.path.resolve())), record)
    supervisor.handle_signals()
    try:
        start_everything(cfg, supervisor, record, with_lab)
        step("first jobs: server and SAN facts" + (", the tiny template" if with_lab else ""))
        for job in first_jobs(cfg, with_lab):
            click.echo(f"  {job.kind} {job.target}: {job.state}" + (f" ({job.error_code}: {job.error_message})" if job.error_code else ""))
        if with_lab:
            click.echo(f"  backup stores: {', '.join(lab_backup_stores(cfg))}")
        print_banner(cfg)
        click.echo(f"stopping: {supervisor.watch()}")
    except StopRequested as stop:
        click.echo(f"stopping: {stop}")
    finally:
        stop_everything(cfg, supervisor, record, with_lab)


def stop_everything(cfg: config.Config, supervisor: Supervisor, record: RunRecord, with_lab: bool) -> None:
    stuck = supervisor.stop_all()
    if with_lab:
        lab_cluster.down(cfg)
    if stuck:
        # The record stays, so the next start tries these again.
        click.echo(f"still running after SIGKILL: process groups {', '.join(map(str, sorted(stuck)))}", err=True)
        return
    record.remove()
    click.echo("everything stopped")


def start_everything(cfg: config.Config, supervisor: Supervisor, record: RunRecord, with_lab: bool) -> None:
    step("redis")
    supervisor.start(redis_service(cfg))
    wait_until(lambda: _redis_answers(cfg.redis_url), READY_TIMEOUT_S, "redis to answer")
    step("database migrations")
    migrate(cfg.db_url)
    if with_lab:
        step("lab cluster (namespaces, libvirtds, tgtds)")
        record.mark_lab_up()
        lab_cluster.up(cfg)
    step("inventory")
    engine = make_engine(cfg.db_url)
    with transaction(make_session_factory(engine)) as session:
        sync_from_config(session, cfg)
        publish_all(session, cfg)
    engine.dispose()
    step("celery workers, beat, flower, api")
    for service in celery_services(cfg):
        supervisor.start(service)
    api = cfg.section("api")
    supervisor.start(api_service(cfg))
    wait_until(lambda: _http_ok(f"http://{api['host']}:{api['port']}/health"), READY_TIMEOUT_S, "the API to answer")


def print_banner(cfg: config.Config) -> None:
    api, flower = cfg.section("api"), cfg.section("flower")
    click.echo(
        f"\nLaxCluster is running.\n"
        f"  API     http://{api['host']}:{api['port']}   (create a token: laxcluster token create --role admin)\n"
        f"  Flower  http://{flower['host']}:{flower['port']}   user {flower['user']}, password {flower_password(cfg.var_dir)}\n"
        f"  logs    {cfg.var_dir.resolve() / 'log'}\n"
        f"Ctrl-C stops everything.\n"
    )


def step(what: str) -> None:
    click.echo(f"starting {what} ...")


def _redis_answers(url: str) -> bool:
    try:
        return redis.Redis.from_url(url).ping()
    except redis.ConnectionError:
        return False


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False
