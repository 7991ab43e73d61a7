"""Bring the whole lab up, tear it down, and tell what runs: `laxcluster lab up|down|status`.

`up` and `down` are idempotent and converge from any half-made state: names come from the
topology (the config), PIDs from pidfiles and `<lab_dir>/state.json`, and `down` also sweeps
everything carrying the lab prefix (namespaces, bridges) and every process still living in one
of the lab's namespaces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from config import Config, replication_address
from lab import dhcp, libvirtd, netns, pool, processes, sshd, tgtd
from lab.topology import Host, Topology, VmNetwork, build, host_uuid, server_uri, tgt_control_port
from workers.command import output

STATE_FILE = "state.json"


def up(cfg: Config) -> dict[str, Any]:
    """Build every bridge, namespace, pool and daemon of the lab that is missing; return `status`.

    Cluster servers start before the pools are mounted, so their mount namespaces (and their
    guests') never hold a copy of a pool mount; a SAN host's libvirtd (for VMs run there for
    maintenance) starts after its pool, which its guests open by path.
    """
    topo = build(cfg)
    topo.lab_dir.mkdir(parents=True, exist_ok=True)
    state = _load_state(topo)
    for net in topo.networks:
        netns.ensure_bridge(net)
    networks = {net.name: net for net in topo.networks}
    for host in topo.hosts:
        netns.ensure_host(host, networks)
    _bring_up_vm_networks(cfg, topo)
    for host in topo.servers():
        state["servers"][host.name] = libvirtd.start(_server_daemons(topo, host))
        _save_state(topo, state)
    # Each SAN's sshd lets in the replication key alone, so that key must exist before the first starts.
    sshd.ensure_key(cfg.replication.key_file.resolve(), "laxcluster-lab-replication")
    for host in topo.sans():
        _bring_up_san(cfg, topo, host, state)
    _write_known_hosts(cfg, topo)
    for host in topo.backup_hosts():
        daemon = backup_host(topo, host)
        daemon.prepare()
        state["backup_hosts"][host.name] = sshd.ensure(daemon, state["backup_hosts"].get(host.name))
        _save_state(topo, state)
    for host, uri in _libvirt_hosts(cfg, topo):
        libvirtd.wait_answering(uri, host.name)
    return status(cfg)


def down(cfg: Config) -> None:
    """Stop every lab process, unmount and detach the pools, delete namespaces, veths and bridges.

    Harmless when nothing runs; cleans up after a crash too. Keeps the data under the lab
    directory (pool images, each server's libvirt config and caches).
    """
    topo = build(cfg)
    state = _load_state(topo)
    stray = _stray_namespaces(topo)
    _stop_processes(cfg, topo, state, stray)
    dhcp.stop_all(cfg.dhcp_dir.resolve(), list(topo.vm_networks))
    _release_pools(cfg, topo, state)
    _remove_network(topo, stray)
    (topo.lab_dir / STATE_FILE).unlink(missing_ok=True)


def _stop_processes(cfg: Config, topo: Topology, state: dict[str, Any], stray: list[str]) -> None:
    # Servers first: their guests may use the SANs' LUNs.
    for host in topo.servers():
        processes.stop(netns.netns_pids(host.netns))  # its daemons and guests
        libvirtd.stop(_server_daemons(topo, host))  # daemons whose namespace is already gone
    for host in topo.sans():
        control_port = tgt_control_port(cfg, host.name)
        recorded = state["sans"].get(host.name, {}).get("tgtd")
        tgtd.stop(control_port, tgtd.running_pid(_portal(cfg, host.name), control_port, recorded))
        sshd.stop(replication_host(cfg, topo, host), state["sans"].get(host.name, {}).get("sshd"))
        processes.stop(netns.netns_pids(host.netns))  # its libvirtd, the guests it runs, open SSH sessions
        libvirtd.stop(_server_daemons(topo, host))
    for host in topo.backup_hosts():
        sshd.stop(backup_host(topo, host), state["backup_hosts"].get(host.name))
        processes.stop(netns.netns_pids(host.netns))
    for name in stray:
        processes.stop(netns.netns_pids(name))


def _release_pools(cfg: Config, topo: Topology, state: dict[str, Any]) -> None:
    for image, mountpoint in _pools(cfg, topo, state):
        pool.teardown(image, mountpoint)
    for mountpoint in pool.mounts_under(topo.lab_dir):
        pool.unmount_all(mountpoint)


def _remove_network(topo: Topology, stray: list[str]) -> None:
    for name in [*(h.netns for h in topo.hosts), *stray]:
        netns.delete_netns(name)
    veths = [link.veth for h in topo.hosts for link in (*h.links, *h.vm_links)]
    bridges = [n.bridge for n in (*topo.networks, *topo.vm_networks)]
    for link in [*veths, *_stray_bridges(topo), *bridges]:
        netns.delete_link(link)


def status(cfg: Config) -> dict[str, Any]:
    """What the lab is and whether each part of it runs and answers (plain data, ready for JSON)."""
    topo = build(cfg)
    state = _load_state(topo)
    present = netns.netns_names()
    hosts = []
    for host in topo.hosts:
        entry: dict[str, Any] = {
            "name": host.name,
            "kind": host.kind,
            "site": host.site,
            "netns": host.netns,
            "netns_present": host.netns in present,
            "addresses": host.addresses,
        }
        describe = {"server": _server_status, "san": _san_status, "backup": _backup_status}[host.kind]
        entry.update(describe(cfg, topo, host, state))
        hosts.append(entry)
    networks = [
        {"name": n.name, "cidr": str(n.cidr), "bridge": n.bridge, "address": str(n.bridge_address.ip), "present": netns.link_exists(n.bridge)}
        for n in topo.networks
    ]
    vm_networks = [_vm_network_status(cfg, net) for net in topo.vm_networks]
    healthy = all(n["present"] for n in networks) and all(_host_healthy(h) for h in hosts)
    healthy = healthy and all(n["present"] and n["dhcp"]["answers"] for n in vm_networks)
    return {"prefix": topo.prefix, "lab_dir": str(topo.lab_dir), "up": healthy, "networks": networks,
            "vm_networks": vm_networks, "hosts": hosts}


def _vm_network_status(cfg: Config, net: VmNetwork) -> dict[str, Any]:
    pid = dhcp.running_pid(_dhcp_server(cfg, net)) if net.dhcp else None
    return {"name": net.name, "cidr": str(net.cidr), "bridge": net.bridge, "address": str(net.bridge_address.ip),
            "subnet": net.subnet, "present": netns.link_exists(net.bridge),
            "dhcp": {"name": "dnsmasq", "pid": pid, "answers": pid is not None or not net.dhcp}}


def _bring_up_vm_networks(cfg: Config, topo: Topology) -> None:
    """Each VM network's bridge (with the subnet's gateway), every server's way onto it, and its dnsmasq."""
    for net in topo.vm_networks:
        netns.ensure_bridge(net)
    bridges = {net.name: net.bridge for net in topo.vm_networks}
    for host in topo.servers():
        for link in host.vm_links:
            netns.ensure_vm_link(host, link, bridges[link.network])
    for net in topo.vm_networks:
        if net.dhcp:
            dhcp.start(_dhcp_server(cfg, net))


def _dhcp_server(cfg: Config, net: VmNetwork) -> dhcp.DhcpServer:
    return dhcp.DhcpServer(net, cfg.dhcp_dir.resolve())


def _host_healthy(entry: dict[str, Any]) -> bool:
    pool_ok = entry["pool"]["mounted"] if "pool" in entry else True
    return entry["netns_present"] and pool_ok and all(d["answers"] for d in entry["daemons"])


def _server_status(cfg: Config, topo: Topology, host: Host, _state: dict[str, Any]) -> dict[str, Any]:
    return {"daemons": _libvirt_status(topo, host, server_uri(cfg, host.name))}


def _libvirt_status(topo: Topology, host: Host, uri: str) -> list[dict[str, Any]]:
    pids = _server_daemons(topo, host).pids()
    answered = libvirtd.hostname_over_tcp(uri) if pids["libvirtd"] else None
    daemons = [{"name": name, "pid": pid, "answers": pid is not None} for name, pid in pids.items() if name != "libvirtd"]
    daemons.append({"name": "libvirtd", "pid": pids["libvirtd"], "answers": answered == host.name, "uri": uri, "hostname": answered})
    return daemons


def _san_status(cfg: Config, topo: Topology, host: Host, state: dict[str, Any]) -> dict[str, Any]:
    control_port = tgt_control_port(cfg, host.name)
    portal = _portal(cfg, host.name)
    recorded = state["sans"].get(host.name, {}).get("tgtd")
    pid = tgtd.running_pid(portal, control_port, recorded)
    image, mountpoint = _pool_paths(cfg, topo, host.name)
    loops = pool.loop_devices(image)
    uri = cfg.san(host.name)[1].uri
    return {
        "daemons": [{"name": "tgtd", "pid": pid, "answers": pid is not None and tgtd.answers(control_port), "portal": portal, "control_port": control_port},
                    *(_libvirt_status(topo, host, uri) if uri else []),
                    _sshd_status(replication_host(cfg, topo, host), state["sans"].get(host.name, {}).get("sshd"))],
        "pool": {"image": str(image), "mountpoint": str(mountpoint), "mounted": bool(loops) and pool.is_mounted(mountpoint, source=loops[0]), "loop": loops[0] if loops else None},
    }


def _backup_status(_cfg: Config, topo: Topology, host: Host, state: dict[str, Any]) -> dict[str, Any]:
    daemon = backup_host(topo, host)
    return {"daemons": [_sshd_status(daemon, state["backup_hosts"].get(host.name))],
            "store": str(daemon.store), "client_key": str(daemon.client_key)}


def _sshd_status(daemon: sshd.SshHost, recorded: int | None) -> dict[str, Any]:
    pid = sshd.running_pid(daemon, recorded)
    return {"name": "sshd", "pid": pid, "answers": pid is not None and sshd.answers(daemon),
            "address": daemon.address, "port": daemon.port}


def backup_host(topo: Topology, host: Host) -> sshd.BackupHost:
    """The sshd side of lab backup host `host`: its address on the backup network and its key directory."""
    return sshd.BackupHost.at(host.name, host.netns, host.address("backup"), topo.lab_dir / host.name)


def replication_host(cfg: Config, topo: Topology, host: Host) -> sshd.SshHost:
    """The sshd side of lab SAN `host` for DR replication: on the SAN's replication address and the configured
    port, letting in the replication key alone; host key and config beside the SAN's other files."""
    _site, san = cfg.san(host.name)
    return sshd.SshHost(host.name, host.netns, replication_address(san), cfg.replication.port, topo.lab_dir / host.name,
                        sshd.public_half(cfg.replication.key_file.resolve()))


def _write_known_hosts(cfg: Config, topo: Topology) -> None:
    """(Re)write the replication known_hosts file: one line per SAN, its lab host key, and no other host."""
    path = cfg.replication.known_hosts_file.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(replication_host(cfg, topo, host).known_hosts_line() + "\n" for host in topo.sans()))
    partial.replace(path)


def _bring_up_san(cfg: Config, topo: Topology, host: Host, state: dict[str, Any]) -> None:
    _site, san = cfg.san(host.name)
    image, mountpoint = _pool_paths(cfg, topo, host.name)
    loop = pool.ensure(image, san.pool_size, mountpoint)
    record = state["sans"].setdefault(host.name, {})
    record.update(image=str(image), mountpoint=str(mountpoint), loop=loop)
    _save_state(topo, state)
    control_port = tgt_control_port(cfg, host.name)
    record["tgtd"] = tgtd.running_pid(san.portal, control_port, record.get("tgtd")) or tgtd.start(
        host.netns, san.portal, control_port, topo.lab_dir / host.name / "tgtd.log"
    )
    if san.uri:
        record["libvirtd"] = libvirtd.start(_server_daemons(topo, host))
    _save_state(topo, state)
    # After the pool is mounted: a peer's login (in the root mount namespace) finds the replica volumes there.
    record["sshd"] = sshd.ensure(replication_host(cfg, topo, host), record.get("sshd"))
    _save_state(topo, state)


def _libvirt_hosts(cfg: Config, topo: Topology) -> list[tuple[Host, str]]:
    """The hosts running a libvirtd, with its URI: every server, and each SAN given one."""
    sans = [(host, cfg.san(host.name)[1].uri) for host in topo.sans()]
    return [(host, server_uri(cfg, host.name)) for host in topo.servers()] + [(h, uri) for h, uri in sans if uri]


def _server_daemons(topo: Topology, host: Host) -> libvirtd.ServerDaemons:
    return libvirtd.ServerDaemons(
        name=host.name,
        netns=host.netns,
        mgmt_address=host.address("mgmt"),
        host_uuid=host_uuid(topo.prefix, host.name),
        directory=topo.lab_dir / host.name,
    )


def _pool_paths(cfg: Config, topo: Topology, san_name: str) -> tuple[Path, Path]:
    _site, san = cfg.san(san_name)
    return topo.lab_dir / san_name / "pool.img", san.pool_path.resolve()


def _pools(cfg: Config, topo: Topology, state: dict[str, Any]) -> list[tuple[Path, Path]]:
    """Pools of the config plus any that state.json recorded (the config may have changed since)."""
    found = [_pool_paths(cfg, topo, host.name) for host in topo.sans()]
    found += [(Path(r["image"]), Path(r["mountpoint"])) for r in state["sans"].values() if "image" in r]
    return list(dict.fromkeys(found))


def _portal(cfg: Config, san_name: str) -> str:
    return cfg.san(san_name)[1].portal


def _stray_namespaces(topo: Topology) -> list[str]:
    """Namespaces with the lab's prefix that the topology does not have (left by an older config or a crash)."""
    ours = {h.netns for h in topo.hosts}
    return sorted(name for name in netns.netns_names() if name.startswith(f"{topo.prefix}-") and name not in ours)


def _stray_bridges(topo: Topology) -> list[str]:
    names = [line.split()[0].split("@")[0] for line in output(["ip", "-br", "link", "show", "type", "bridge"]).splitlines() if line.strip()]
    ours = {n.bridge for n in (*topo.networks, *topo.vm_networks)}
    return [name for name in names if name.startswith(f"{topo.prefix}-") and name not in ours]


def _load_state(topo: Topology) -> dict[str, Any]:
    path = topo.lab_dir / STATE_FILE
    state = json.loads(path.read_text()) if path.exists() else {}
    state.setdefault("prefix", topo.prefix)
    state.setdefault("servers", {})
    state.setdefault("sans", {})
    state.setdefault("backup_hosts", {})
    return state


def _save_state(topo: Topology, state: dict[str, Any]) -> None:
    path = topo.lab_dir / STATE_FILE
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(state, indent=2, sort_keys=True))
    partial.replace(path)
