"""A lab of its own for a test run: unique prefix, free subnets, small pools, always torn down.

`make_test_config(tmp)` writes the config; `running_lab(path)` brings that lab up and down.
A session-scoped pytest fixture wraps the two so all integration tests share one lab.
"""

from __future__ import annotations

import ipaddress
import random
import string
import tomllib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import config
from lab import cluster, netns, pool, processes, topology
from lab.tgtd import SOCKET_DIR
from lab.topology import TGT_CONTROL_PORT_MAX
from workers.command import output

TEST_POOL_SIZE = "4G"


def make_test_config(tmp_dir: Path) -> Path:
    """Write `<tmp_dir>/laxcluster.toml`: the default two-site lab under a random prefix and free
    10.X.0.0/24 subnets, with var_dir inside `tmp_dir`, 4G pools and unused tgtd control ports."""
    raw = tomllib.loads(config.DEFAULTS.read_text())
    var_dir = (tmp_dir / "var").resolve()
    # Tests kill daemons and workers on purpose; only the HA tests (LAXCLUSTER_HA_ENABLED) want restarts.
    raw["ha"]["enabled"] = False
    lab = raw["lab"]
    lab["prefix"] = "lt" + "".join(random.choices(string.ascii_lowercase + string.digits, k=3))
    sans = [san for site in raw["sites"] for san in site.get("sans", [])]
    for index, san in enumerate(sans, start=_free_control_port_base(len(sans))):
        san["tgt_control_port"] = index
    free = _free_networks()
    moves = _move_networks(lab["networks"], free)
    _move_vm_subnets(raw, free)
    raw["var_dir"] = str(var_dir)
    for host in raw.get("backup_hosts", []):
        host["addresses"] = {net: moves[net](addr) for net, addr in host["addresses"].items()}
    for site in raw["sites"]:
        for san in site.get("sans", []):
            san["addresses"] = {net: moves[net](addr) for net, addr in san["addresses"].items()}
            san["portal"] = f"{san['addresses']['storage']}:{san['portal'].rpartition(':')[2]}"
            if "uri" in san:
                san["uri"] = f"qemu+tcp://{san['addresses']['mgmt']}/system"
            san["pool_path"] = str(var_dir / "lab" / san["name"] / "pool")
            san["pool_size"] = TEST_POOL_SIZE
        for cluster_raw in site.get("clusters", []):
            for server in cluster_raw.get("servers", []):
                server["addresses"] = {net: moves[net](addr) for net, addr in server["addresses"].items()}
                server["uri"] = f"qemu+tcp://{server['addresses']['mgmt']}/system"
    path = tmp_dir / "laxcluster.toml"
    path.write_text(_toml(raw))
    return path


@contextmanager
def running_lab(config_path: Path) -> Iterator[config.Config]:
    """Bring the lab of `config_path` up, yield its Config, and always tear it down (also on failure)."""
    cfg = config.load(config_path)
    try:
        cluster.up(cfg)
        yield cfg
    finally:
        cluster.down(cfg)


def leftovers(cfg: config.Config, pids: Iterable[int]) -> list[str]:
    """Everything of the lab of `cfg` still on the machine: namespaces and links with its prefix,
    loop devices on its images, mounts under its var_dir, and which of `pids` still live."""
    topo = topology.build(cfg)
    found = [f"netns {name}" for name in netns.netns_names() if name.startswith(f"{topo.prefix}-")]
    links = output(["ip", "-o", "link", "show"]).splitlines()
    found += [f"link {name}" for name in (line.split(":")[1].strip().split("@")[0] for line in links) if name.startswith(topo.prefix)]
    found += [f"loop {loop}" for image in topo.lab_dir.glob("*/pool.img") for loop in pool.loop_devices(image)]
    found += [f"mount {m}" for m in pool.mounts_under(cfg.var_dir)]
    found += [f"process {pid} {' '.join(processes.cmdline(pid))}" for pid in pids if processes.alive(pid)]
    return found


def _free_networks() -> list[ipaddress.IPv4Network]:
    """10.X.0.0/24 networks (X in 100-199, random order) that overlap no address of the machine."""
    taken = _networks_in_use()
    candidates = [ipaddress.IPv4Network(f"10.{x}.0.0/24") for x in random.sample(range(100, 200), 100)]
    return [net for net in candidates if not any(net.overlaps(used) for used in taken)]


def _move_networks(networks: dict[str, Any], free: list[ipaddress.IPv4Network]) -> dict[str, Any]:
    """Give each lab network a network taken from `free`, in place; return, per network, how to move a host
    address onto it."""
    moves = {}
    for name, net in networks.items():
        new = free.pop(0)
        old = ipaddress.IPv4Network(net["cidr"])
        net["cidr"] = str(new)
        net["bridge_address"] = _moved(net["bridge_address"], old, new)
        moves[name] = lambda addr, old=old, new=new: _moved(addr, old, new)
    return moves


def _move_vm_subnets(raw: dict[str, Any], free: list[ipaddress.IPv4Network]) -> None:
    """Move each subnet a VM network carries onto a network taken from `free`: its gateway goes on a bridge of
    the root namespace, where the default subnet's might already be (a `make run` lab)."""
    carried = {net["subnet"] for site in raw["sites"] for net in site.get("vm_networks", [])}
    for subnet in raw.get("subnets", []):
        if subnet["name"] not in carried:
            continue
        old, new = ipaddress.IPv4Network(subnet["cidr"]), free.pop(0)
        subnet["cidr"] = str(new)
        for key in ("gateway", "range_start", "range_end"):
            if key in subnet:
                subnet[key] = _moved(subnet[key], old, new)


def _moved(address: str, old: ipaddress.IPv4Network, new: ipaddress.IPv4Network) -> str:
    return str(new.network_address + (int(ipaddress.IPv4Address(address)) - int(old.network_address)))


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    # Every IPv4 network of the root namespace, plus 10.X nets of other labs' bridges (same place).
    listing = output(["ip", "-4", "-o", "addr", "show"])
    return [ipaddress.IPv4Interface(line.split()[3]).network for line in listing.splitlines() if line.strip()]


def _free_control_port_base(count: int) -> int:
    used = {p.name.split(".")[1] for p in SOCKET_DIR.glob("socket.*")} if SOCKET_DIR.exists() else set()
    while True:
        base = random.randrange(1000, TGT_CONTROL_PORT_MAX - count)
        if not any(str(base + i) in used for i in range(count)):
            return base


def _toml(table: dict[str, Any], path: tuple[str, ...] = ()) -> str:
    """TOML text for `table`: enough of TOML for a config (scalars, inline tables of scalars, tables, arrays of tables)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in table.items() if not _is_table(value, path) and not _is_table_array(value)]
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in table.items():
        if _is_table(value, path):
            text += f"\n[{'.'.join((*path, key))}]\n" + _toml(value, (*path, key))
        elif _is_table_array(value):
            for item in value:
                text += f"\n[[{'.'.join((*path, key))}]]\n" + _toml(item, (*path, key))
    return text


def _is_table(value: Any, path: tuple[str, ...]) -> bool:
    # Top-level sections stay sections; a nested dict of scalars (addresses) is written inline.
    return isinstance(value, dict) and (not path or any(isinstance(v, (dict, list)) for v in value.values()))


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
