"""The SAN's drivers for a configured SAN: its volume backend and its tgt iSCSI target."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Config, SanConfig, SiteConfig
from errors import UnknownBackend
from models import ClusterServer, Template, Volume
from workers.san.backend import VolumeBackend
from workers.san.lvm import LvmThinBackend
from workers.san.reflink import ReflinkBackend
from workers.san.tgt import Tgt


def backend_for(san: SanConfig) -> VolumeBackend:
    """The volume backend the config chose for `san` (`reflink`: a pool directory; `lvm`: a volume group)."""
    if san.backend == "reflink":
        return ReflinkBackend(str(san.pool_path.resolve()))
    if san.backend == "lvm" and san.volume_group:
        return LvmThinBackend(san.volume_group)
    raise UnknownBackend(f"SAN {san.name}: unknown backend {san.backend!r} (reflink with pool_path, or lvm with volume_group)", san=san.name)


def target_for(san: SanConfig) -> Tgt:
    return Tgt(control_port=san.tgt_control_port)


def site_initiators(session: Session, site: SiteConfig) -> tuple[str, ...]:
    """The initiator names allowed to log in to this site's targets: its cluster servers', but for those
    fenced off (until `server activate` re-admits them)."""
    fenced = set(session.scalars(select(ClusterServer.initiator_iqn).where(ClusterServer.fenced_at.is_not(None))))
    return tuple(server.initiator for cluster in site.clusters for server in cluster.servers
                 if server.initiator not in fenced)


def san_of_site(config: Config, site_name: str) -> SanConfig:
    for site, san in config.sans():
        if site.name == site_name:
            return san
    raise KeyError(f"site {site_name} has no SAN")


def handle_in_use(session: Session, san_id: int, handle: str) -> bool:
    """Whether a row of the inventory (a volume or a template on the SAN) stands on backend volume `handle`:
    an undo deletes a volume it made only when no row does, whatever the names."""
    for model in (Volume, Template):
        if session.scalar(select(model.id).where(model.san_id == san_id, model.backend_handle == handle).limit(1)) is not None:
            return True
    return False
