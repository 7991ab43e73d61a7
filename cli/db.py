"""`laxcluster db upgrade`: the inventory DB at the newest schema, holding what the config file declares.

What `laxcluster run` does before it starts anything, for deployments that start the services
themselves (docker/compose.yaml runs it once, as its `migrate` service)."""

import click

import config
from models.db import make_engine, make_session_factory, migrate, transaction
from tasks.inventory.config_sync import sync_from_config


@click.group("db")
def db() -> None:
    """The inventory database."""


@db.command("upgrade")
def upgrade() -> None:
    """Migrate the DB to the newest schema, then add the sites, SANs, clusters, servers and subnets of the config."""
    cfg = config.load()
    migrate(cfg.db_url)
    engine = make_engine(cfg.db_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            sync_from_config(session, cfg)
    finally:
        engine.dispose()
    click.echo(f"the inventory at {engine.url.render_as_string(hide_password=True)} is up to date with {cfg.path}")
