"""Bringing the inventory in line with the configuration: sites, clusters, servers and SANs."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Config
from models import Cluster, ClusterServer, San, Site, Subnet
from tasks.inventory import ipam

CONFIGURED = "set in the configuration"


def sync_from_config(session: Session, config: Config) -> None:
    """Create or update the Site, Cluster, ClusterServer and San rows the config describes, and add
    its subnets that the network DB does not have yet."""
    for subnet in config.raw.get("subnets", []):
        if session.scalar(select(Subnet.id).where(Subnet.name == subnet["name"])) is None:
            ipam.create_subnet(session, name=subnet["name"], cidr=subnet["cidr"], gateway=subnet.get("gateway"),
                               dns=list(subnet.get("dns", [])), range_start=subnet["range_start"],
                               range_end=subnet["range_end"], mac_prefix=subnet.get("mac_prefix", "52:54:00"))
    for site_config in config.sites:
        site = _named(session, Site, site_config.name) or Site(name=site_config.name)
        session.add(site)
        for san_config in site_config.sans:
            san = _named(session, San, san_config.name) or San(name=san_config.name, site=site)
            san.site, san.backend, san.portal = site, san_config.backend, san_config.portal
            san.pool_path = str(san_config.pool_path)
            session.add(san)
        for cluster_config in site_config.clusters:
            cluster = _named(session, Cluster, cluster_config.name) or Cluster(name=cluster_config.name, site=site)
            cluster.site = site
            session.add(cluster)
            for server_config in cluster_config.servers:
                server = _named(session, ClusterServer, server_config.name) or ClusterServer(name=server_config.name)
                server.cluster = cluster
                server.libvirt_uri = server_config.uri
                server.initiator_iqn = server_config.initiator
                server.memory_limit_bytes = server_config.memory_limit
                if server_config.hypervisor is not None:
                    server.hypervisor, server.hypervisor_evidence = server_config.hypervisor, CONFIGURED
                session.add(server)
    session.flush()


def _named(session: Session, model: type, name: str):
    return session.scalar(select(model).where(model.name == name))
