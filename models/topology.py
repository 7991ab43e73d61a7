"""Where things run: sites, their SANs, clusters and cluster servers."""

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, utcnow


class Site(Base):
    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    clusters: Mapped[list["Cluster"]] = relationship(back_populates="site")
    sans: Mapped[list["San"]] = relationship(back_populates="site")


class Cluster(Base):
    __tablename__ = "clusters"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    site: Mapped[Site] = relationship(back_populates="clusters")
    servers: Mapped[list["ClusterServer"]] = relationship(back_populates="cluster")


class ClusterServer(Base):
    """A hypervisor host. Facts are what libvirt last reported, refreshed by a job."""

    __tablename__ = "cluster_servers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"))
    cluster: Mapped[Cluster] = relationship(back_populates="servers")
    libvirt_uri: Mapped[str] = mapped_column(String(255))
    initiator_iqn: Mapped[str] = mapped_column(String(223))
    memory_limit_bytes: Mapped[int | None] = mapped_column(BigInteger)
    maintenance: Mapped[bool] = mapped_column(default=False)
    # Set while the server is fenced off at its site's SAN (no initiator login, no placements); cleared by
    # `server activate` once its stale domains are gone.
    fenced_at: Mapped[datetime | None]
    reachable: Mapped[bool | None]
    cpu_count: Mapped[int | None]
    cpu_model: Mapped[str | None] = mapped_column(String(127))
    cpu_mhz: Mapped[int | None]
    memory_total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    memory_free_bytes: Mapped[int | None] = mapped_column(BigInteger)
    hypervisor_type: Mapped[str | None] = mapped_column(String(31))
    hypervisor_version: Mapped[str | None] = mapped_column(String(31))
    # The kind a VM's domain type follows (kvm, qemu, xen): from the config, else from a probe at refresh;
    # the evidence says which, and what the probe saw.
    hypervisor: Mapped[str | None] = mapped_column(String(15))
    hypervisor_evidence: Mapped[str | None] = mapped_column(String(255))
    hostname: Mapped[str | None] = mapped_column(String(255))
    facts_updated_at: Mapped[datetime | None]


class San(Base):
    """A storage server: a volume backend and an iSCSI target portal."""

    __tablename__ = "sans"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    site: Mapped[Site] = relationship(back_populates="sans")
    backend: Mapped[str] = mapped_column(String(31))
    pool_path: Mapped[str] = mapped_column(String(1023))
    portal: Mapped[str] = mapped_column(String(255))
    facts: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
