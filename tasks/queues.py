"""Queue names: `control` for workflows, `san.<site>` on each SAN, `node.<server>` on each cluster server."""

from config import Config

CONTROL = "control"


def san_queue(site: str) -> str:
    return f"san.{site}"


def node_queue(server: str) -> str:
    return f"node.{server}"


def all_queues(config: Config) -> list[str]:
    """Every queue the configured cluster needs a worker for."""
    sites = [san_queue(site.name) for site in config.sites if site.sans]
    nodes = [node_queue(server.name) for _, _, server in config.servers()]
    return [CONTROL, *sites, *nodes]
