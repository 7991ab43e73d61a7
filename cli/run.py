"""`laxcluster run`: the whole embedded LaxCluster in the foreground, stopped cleanly by Ctrl-C."""

import os

import click
import redis
import requests

import config
from cli.bootstrap import first_jobs, lab_backup_stores
from cli.services import Supervisor, api_service, celery_services, flower_password, redis_service
from errors import LaxError
from lab import cluster as lab_cluster
from lab.processes import wait_until
from models.db import make_engine, make_session_factory, migrate, transaction
from tasks.inventory.config_sync import sync_from_config

READY_TIMEOUT_S = 90


@click.command()
@click.option("--lab/--no-lab", "with_lab", default=True, show_default=True,
              help="Bring the lab cluster up first (and down again on exit).")
def run(with_lab: bool) -> None:
    """Start Redis, migrations, the lab, a worker per queue, beat, Flower and the API; Ctrl-C stops all."""
    cfg = config.load()
    cfg.var_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(dict(os.environ, LAXCLUSTER_CONFIG=str(cfg.path.resolve())))
    try:
        start_everything(cfg, supervisor, with_lab)
        step("first jobs: server and SAN facts" + (", the tiny template" if with_lab else ""))
        for job in first_jobs(cfg, with_lab):
            click.echo(f"  {job.kind} {job.target}: {job.state}" + (f" ({job.error_code}: {job.error_message})" if job.error_code else ""))
        if with_lab:
            click.echo(f"  backup stores: {', '.join(lab_backup_stores(cfg))}")
        print_banner(cfg)
        click.echo(f"stopping: {supervisor.watch()}")
    except LaxError as error:
        raise click.ClickException(error.message) from error
    finally:
        supervisor.stop_all()
        if with_lab:
            lab_cluster.down(cfg)
        click.echo("everything stopped")


def start_everything(cfg: config.Config, supervisor: Supervisor, with_lab: bool) -> None:
    step("redis")
    supervisor.start(redis_service(cfg))
    wait_until(lambda: _redis_answers(cfg.redis_url), READY_TIMEOUT_S, "redis to answer")
    step("database migrations")
    migrate(cfg.db_url)
    if with_lab:
        step("lab cluster (namespaces, libvirtds, tgtds)")
        lab_cluster.up(cfg)
    step("inventory")
    engine = make_engine(cfg.db_url)
    with transaction(make_session_factory(engine)) as session:
        sync_from_config(session, cfg)
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
