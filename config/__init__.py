"""LaxCluster's configuration: one TOML file plus LAXCLUSTER_* environment overrides.

The file is `$LAXCLUSTER_CONFIG`, else `./laxcluster.toml`, else the packaged defaults (the
embedded setup: SQLite under var/, a local Redis, the lab cluster). A scalar in a section is
overridden by `LAXCLUSTER_<SECTION>_<KEY>` (`LAXCLUSTER_API_PORT=8081`), a top-level scalar by
`LAXCLUSTER_<KEY>` (`LAXCLUSTER_VAR_DIR=/srv/lax`).
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from config.units import parse_size

DEFAULTS = Path(__file__).with_name("defaults.toml")
# A server's hypervisor kind: KVM, QEMU without acceleration (TCG), or Xen through libxl.
HYPERVISOR_KINDS = ("kvm", "qemu", "xen")


@dataclass(frozen=True)
class ServerConfig:
    name: str
    uri: str
    initiator: str
    memory_limit: int | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    # None: refresh-server detects it with a probe domain.
    hypervisor: str | None = None
    # The VM networks this server joins, each by the name of its bridge on this server.
    vm_bridges: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VmNetworkConfig:
    """A site's VM network ("intranet"): one L2 segment, apart from management, storage and backup, that
    the guests' NICs join through a bridge on each server; `subnet` is the subnet whose leases live on it.
    With `dhcp`, a DHCP server hands out exactly the subnet's leases and seeds ask DHCP for the address.
    `stretched`: the same network name at two sites is one segment (DR), allowed only when both say so."""

    name: str
    subnet: str
    dhcp: bool = False
    stretched: bool = False


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    servers: list[ServerConfig]


@dataclass(frozen=True)
class SanConfig:
    name: str
    backend: str
    pool_path: Path
    pool_size: int
    portal: str
    addresses: dict[str, str] = field(default_factory=dict)
    # tgtd's control port (`tgtadm -C N`); None is tgtd's default, one tgtd per host.
    tgt_control_port: int | None = None
    # The `lvm` backend's volume group (its thin pool is called "pool").
    volume_group: str | None = None
    # The SAN host's own libvirt, which runs VMs for maintenance (`vm start --on-san`); None: it runs none.
    uri: str | None = None
    hypervisor: str = "kvm"


@dataclass(frozen=True)
class ReplicationConfig:
    """SSH from a SAN's worker to its peer SAN host, where `remote_python -m workers.san.receive` applies the stream."""

    user: str
    port: int
    key_file: Path
    known_hosts_file: Path
    remote_python: str


def replication_address(san: SanConfig) -> str:
    """The address a peer SAN reaches `san` on for replication: its `replication` address, else its storage one."""
    return san.addresses.get("replication") or san.addresses.get("storage") or san.portal.rpartition(":")[0]


@dataclass(frozen=True)
class SiteConfig:
    name: str
    sans: list[SanConfig]
    clusters: list[ClusterConfig]
    vm_networks: list[VmNetworkConfig] = field(default_factory=list)


@dataclass(frozen=True)
class Config:
    path: Path
    raw: dict[str, Any]
    var_dir: Path
    sites: list[SiteConfig]

    def section(self, name: str) -> dict[str, Any]:
        return self.raw.get(name, {})

    @property
    def redis_url(self) -> str:
        redis = self.section("redis")
        auth = f":{quote(redis['password'], safe='')}@" if redis.get("password") else ""
        return f"redis://{auth}{redis['host']}:{redis['port']}/{redis.get('db', 0)}"

    @property
    def db_url(self) -> str:
        return self.section("db").get("url") or f"sqlite:///{(self.var_dir / 'laxcluster.db').resolve()}"

    @property
    def import_dir(self) -> Path:
        """The only directory template images are imported from (templates.import_dir; empty: <var_dir>/import)."""
        return Path(self.section("templates").get("import_dir") or self.var_dir / "import")

    def servers(self) -> list[tuple[SiteConfig, ClusterConfig, ServerConfig]]:
        return [(site, cluster, server) for site in self.sites for cluster in site.clusters for server in cluster.servers]

    def sans(self) -> list[tuple[SiteConfig, SanConfig]]:
        return [(site, san) for site in self.sites for san in site.sans]

    def san(self, name: str) -> tuple[SiteConfig, SanConfig]:
        """The SAN called `name` and its site; KeyError if the config has none."""
        for site, san in self.sans():
            if san.name == name:
                return site, san
        raise KeyError(f"no SAN named {name} in {self.path}")

    @property
    def replication(self) -> "ReplicationConfig":
        """How a SAN reaches its DR peer (the `[replication]` section, key paths defaulting under var_dir)."""
        raw = self.section("replication")
        folder = self.var_dir / "replication"
        return ReplicationConfig(user=raw.get("user", "root"), port=int(raw.get("port", 22)),
                                 key_file=Path(raw.get("key_file") or folder / "id_ed25519"),
                                 known_hosts_file=Path(raw.get("known_hosts_file") or folder / "known_hosts"),
                                 remote_python=raw.get("remote_python") or sys.executable)

    def vm_network_of(self, subnet: str) -> VmNetworkConfig | None:
        """The VM network carrying `subnet`'s leases; None for a subnet on none (its VMs get user-mode NICs)."""
        return next((net for site in self.sites for net in site.vm_networks if net.subnet == subnet), None)

    def vm_bridge(self, server: str, network: str) -> str | None:
        """The bridge through which `server` joins VM network `network`; None if it does not."""
        return next((s.vm_bridges.get(network) for _, _, s in self.servers() if s.name == server), None)

    @property
    def dhcp_dir(self) -> Path:
        """Where each DHCP-served VM network's hosts file (`<network>.hosts`) and its server's pidfile live."""
        return self.var_dir / "dhcp"


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get("LAXCLUSTER_CONFIG"):
        return Path(environ["LAXCLUSTER_CONFIG"])
    local = Path("laxcluster.toml")
    return local if local.exists() else DEFAULTS


def load(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the config file and apply the environment overrides."""
    environ = os.environ if environ is None else environ
    path = path or config_path(environ)
    raw = tomllib.loads(path.read_text())
    _apply_overrides(raw, environ)
    var_dir = Path(raw.get("var_dir", "var"))
    return Config(path=path, raw=raw, var_dir=var_dir, sites=[_site(s) for s in raw.get("sites", [])])


def _apply_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for key, value in environ.items():
        if not key.startswith("LAXCLUSTER_") or key == "LAXCLUSTER_CONFIG":
            continue
        name = key.removeprefix("LAXCLUSTER_").lower()
        if name in raw and not isinstance(raw[name], (dict, list)):
            raw[name] = _coerce(raw[name], value)
            continue
        for section, table in raw.items():
            if isinstance(table, dict) and name.startswith(section + "_"):
                option = name.removeprefix(section + "_")
                if option in table and not isinstance(table[option], (dict, list)):
                    table[option] = _coerce(table[option], value)


def _coerce(current: Any, value: str) -> Any:
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return value


def _site(raw: dict[str, Any]) -> SiteConfig:
    sans = [
        SanConfig(
            name=s["name"],
            backend=s.get("backend", "reflink"),
            pool_path=Path(s.get("pool_path", "")),
            pool_size=parse_size(s.get("pool_size", "20G")),
            portal=s["portal"],
            addresses=dict(s.get("addresses", {})),
            tgt_control_port=s.get("tgt_control_port"),
            volume_group=s.get("volume_group"),
            uri=s.get("uri"),
            hypervisor=_hypervisor(s, "SAN") or "kvm",
        )
        for s in raw.get("sans", [])
    ]
    clusters = [
        ClusterConfig(
            name=c["name"],
            servers=[
                ServerConfig(
                    name=v["name"],
                    uri=v["uri"],
                    initiator=v["initiator"],
                    memory_limit=parse_size(v["memory_limit"]) if v.get("memory_limit") else None,
                    addresses=dict(v.get("addresses", {})),
                    hypervisor=_hypervisor(v),
                    vm_bridges=dict(v.get("vm_bridges", {})),
                )
                for v in c.get("servers", [])
            ],
        )
        for c in raw.get("clusters", [])
    ]
    networks = [VmNetworkConfig(name=n["name"], subnet=n["subnet"], dhcp=bool(n.get("dhcp", False)),
                                stretched=bool(n.get("stretched", False))) for n in raw.get("vm_networks", [])]
    return SiteConfig(name=raw["name"], sans=sans, clusters=clusters, vm_networks=networks)


def _hypervisor(host: dict[str, Any], what: str = "server") -> str | None:
    kind = host.get("hypervisor") or None
    if kind is not None and kind not in HYPERVISOR_KINDS:
        raise ValueError(f"{what} {host['name']}: hypervisor {kind!r} is not one of {', '.join(HYPERVISOR_KINDS)}")
    return kind
