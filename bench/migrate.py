"""Live migration: downtime, migration time and our overhead, beside libvirt-python alone (issue 6, "Benchmark").

Brings up a lab of its own (`lab.testing`: unique prefix, free subnets, small pools) and a stack on
it in a new temporary directory: a redis-server on a free port, a migrated SQLite DB, one Celery
worker on every queue of the lab and the API (`cli.services`), the inventory from the config, the
first jobs of `laxcluster run` (server facts, the `tiny` template). It installs one idle 256 MiB
`tiny` VM on cs1 through the API and waits until its console shows the boot line. Then, per round,
interleaved so both see the same machine load:

1. ours: `POST /vms/<vm>/actions/migrate {"to": …}` cs1 -> cs2, then cs2 -> cs1, each followed to
   its end (GET /jobs/<id> every 50 ms): libvirt's downtime and migration time from the job's
   result, our overhead = the moment the node worker called `migrateToURI3` minus the moment the
   POST was sent, and POST -> succeeded;
2. the baseline: the same two moves made directly with libvirt-python (`migrateToURI3`, same
   flags, same migration URI, the migratable XML with the destination's initiator and VNC address), downtime
   from the destination's completed job stats.

Both move the guest paused where a live move would corrupt its memory (a TCG guest of QEMU before 9.0,
as on our machines: both take their flags from `workers.node.migrate.migration_flags`), so the figures
compare the same move; the results say which (`live`).

Throughout, a stream of small packets goes from the root namespace to an echo service in the guest over
the VM network (one 9-byte line awaited before the next, lab/echo.py): each migration also
reports the longest wait for a reply while it ran (`longest_gap_ms`), the pause a client of the guest
sees, beside libvirt's downtime.

Prints ours beside the baseline, writes `bench/results/migrate.json`, and stops every process it
started and tears the lab down, also on failure, Ctrl-C or SIGTERM.

Run (root): `.venv/bin/python bench/migrate.py [--rounds 10]`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import libvirt
import redis
import requests

import config
from benchkit import BenchError, booted_console, measure_and_report, require_root_and
from cli.bootstrap import first_jobs
from cli.services import Service, Supervisor, api_service, redis_service
from cli.tokens import create_token
from lab.processes import free_port, wait_until
from lab.testing import make_test_config, running_lab
from models.db import make_engine, make_session_factory, migrate, transaction
from tasks.inventory.config_sync import sync_from_config
from tasks.queues import all_queues
from workers.node.migrate import migration_flags
from lab.echo import ECHO_STARTED, START_ECHO, EchoStream, connect_to

READY_TIMEOUT_S = 120
JOB_TIMEOUT_S = 600


def answers(check: Callable[[], Any]) -> bool:
    try:
        return bool(check())
    except (redis.ConnectionError, requests.RequestException):
        return False


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(self.url + path, json=body, timeout=30)
        if response.status_code != 202:
            raise BenchError(f"POST {path}: {response.status_code} {response.text}")
        return response.json()

    def job_end(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            job = self.http.get(f"{self.url}/jobs/{job_id}", timeout=30).json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                if job["state"] != "succeeded":
                    raise BenchError(f"job {job_id} ({job['kind']}) {job['state']}: {job['error']}")
                return job
            time.sleep(0.05)
        raise BenchError(f"job {job_id} did not end within {JOB_TIMEOUT_S}s")

    def jobs(self, kind: str, target: str, limit: int = 20) -> list[dict[str, Any]]:
        """The newest `limit` jobs of `kind` on `target` (GET /jobs), newest first."""
        response = self.http.get(f"{self.url}/jobs", params={"kind": kind, "target": target, "limit": limit}, timeout=30)
        return response.json()["items"]


def stack_environment(lab_cfg_path: Path, workdir: Path) -> dict[str, str]:
    """LAXCLUSTER_* overrides: the lab's config, this run's DB, a free Redis and API port."""
    return dict(os.environ, LAXCLUSTER_CONFIG=str(lab_cfg_path), LAXCLUSTER_DB_URL=f"sqlite:///{workdir / 'inventory.db'}",
                LAXCLUSTER_REDIS_PORT=str(free_port()), LAXCLUSTER_API_PORT=str(free_port()))


def one_worker(cfg: config.Config) -> list[Service]:
    """One Celery worker (-c 4) on every queue of the lab."""
    return [Service("worker", [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-Q", ",".join(all_queues(cfg)),
                               "-n", f"bench-{secrets.token_hex(3)}@%h", "-c", "4", "--loglevel", "INFO"],
                    cfg.var_dir.resolve() / "log" / "worker.log")]


def start_stack(supervisor: Supervisor, celery: Callable[[config.Config], list[Service]] = one_worker
                ) -> tuple[config.Config, Api]:
    """Redis, DB, inventory, the Celery services `celery` makes (workers: their name starts with "worker"),
    the API and the first jobs; return config and client."""
    cfg = config.load(environ=supervisor.env)
    (cfg.var_dir / "log").mkdir(parents=True, exist_ok=True)
    supervisor.start(redis_service(cfg))
    client = redis.Redis.from_url(cfg.redis_url)
    wait_until(lambda: answers(client.ping), READY_TIMEOUT_S, "redis to answer", interval=0.2)
    client.close()
    migrate(cfg.db_url)
    engine = make_engine(cfg.db_url)
    with transaction(make_session_factory(engine)) as session:
        sync_from_config(session, cfg)
        token = create_token(session, "admin", f"bench-{secrets.token_hex(3)}")
    engine.dispose()
    services = celery(cfg)
    for service in services:
        supervisor.start(service)
    supervisor.start(api_service(cfg))
    api = cfg.section("api")
    url = f"http://{api['host']}:{api['port']}"
    for worker in (service for service in services if service.name.startswith("worker")):
        wait_until(lambda worker=worker: " ready." in worker.log.read_text(), READY_TIMEOUT_S, f"{worker.name} to be ready",
                   interval=0.2)
    wait_until(lambda: answers(lambda: requests.get(f"{url}/health", timeout=2).ok), READY_TIMEOUT_S,
               "the API to answer", interval=0.2)
    for job in first_jobs(cfg, with_lab=True):
        if job.state != "succeeded":
            raise BenchError(f"first job {job.kind} {job.target} {job.state}: {job.error_message}")
    return cfg, Api(url, token)


def server_uri(cfg: config.Config, name: str) -> str:
    return next(server.uri for _, _, server in cfg.servers() if server.name == name)


def initiator(cfg: config.Config, name: str) -> str:
    return next(server.initiator for _, _, server in cfg.servers() if server.name == name)


def wait_booted(uri: str, vm: str) -> None:
    """Until the guest's console shell answers with its boot line; then start its echo service."""
    with booted_console(uri, vm, 300) as console:
        console.write(START_ECHO.encode() + b"\n")
        console.read_until(ECHO_STARTED, timeout=30)


def longest_gap_ms(stream: EchoStream, move: Callable[[], dict[str, float]]) -> dict[str, float]:
    """`move()`'s figures and the longest wait for an echo while it ran (a few replies after it close the last wait)."""
    start = time.monotonic()
    figures = move()
    end = time.monotonic()
    stream.more_replies(5, "echoes after the migration")
    return {**figures, "longest_gap_ms": stream.longest_gap(start, end) * 1000}


def ours(api: Api, vm: str, to: str) -> dict[str, float]:
    """One migration through the API: downtime, libvirt's time, POST -> migrateToURI3, POST -> succeeded."""
    posted = time.time()
    job = api.job_end(api.post(f"/vms/{vm}/actions/migrate", {"to": to})["id"])
    ended = time.time()
    result = job["result"]
    return {"live": result["live"], "downtime_ms": result["downtime_ms"], "migration_ms": result["migration_ms"],
            "overhead_ms": (result["started_at"] - posted) * 1000, "post_to_done_ms": (ended - posted) * 1000}


def destination_xml(xml: str, dest_initiator: str, dest_address: str) -> str:
    """The source's migratable XML as the destination must run it: its disks log in with the destination's
    initiator and its VNC display listens on the destination's address (the source's cannot be bound there)."""
    domain = ET.fromstring(xml)
    for iqn in domain.findall("./devices/disk/source/initiator/iqn"):
        iqn.set("name", dest_initiator)
    for graphics in domain.findall("./devices/graphics[@type='vnc']"):
        if graphics.get("listen") is not None:
            graphics.set("listen", dest_address)
        for listen in graphics.findall("./listen[@type='address']"):
            listen.set("address", dest_address)
    return ET.tostring(domain, encoding="unicode")


def direct(cfg: config.Config, vm: str, source: str, dest: str) -> dict[str, float]:
    """The same move made with libvirt-python alone."""
    source_conn, dest_uri = libvirt.open(server_uri(cfg, source)), server_uri(cfg, dest)
    try:
        domain = source_conn.lookupByName(vm)
        xml = destination_xml(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE),
                              initiator(cfg, dest), urlparse(dest_uri).hostname)
        params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{urlparse(dest_uri).hostname}",
                  libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml}
        flags, _ = migration_flags(source_conn, domain, live=True)  # the node worker's flags, as ours gets them
        started = time.monotonic()
        domain.migrateToURI3(dest_uri, params, flags)
        migration_ms = (time.monotonic() - started) * 1000
    finally:
        source_conn.close()
    dest_conn = libvirt.open(dest_uri)
    try:
        stats = dest_conn.lookupByName(vm).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    finally:
        dest_conn.close()
    return {"live": bool(flags & libvirt.VIR_MIGRATE_LIVE), "downtime_ms": stats.get(libvirt.VIR_DOMAIN_JOB_DOWNTIME),
            "migration_ms": migration_ms}


def summary(samples: list[dict[str, float]], key: str, digits: int = 1) -> dict[str, float]:
    values = sorted(s[key] for s in samples if s.get(key) is not None)
    if not values:
        return {}
    return {"p50": round(statistics.median(values), digits), "max": round(values[-1], digits),
            "min": round(values[0], digits), "n": len(values)}


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    (workdir / "lab").mkdir()
    lab_cfg_path = make_test_config(workdir / "lab")
    supervisor = Supervisor(stack_environment(lab_cfg_path, workdir))
    with running_lab(lab_cfg_path):
        try:
            cfg, api = start_stack(supervisor)
            vm = f"bench-{secrets.token_hex(2)}"
            api.job_end(api.post("/vms", {"name": vm, "template": "tiny", "memory": "256M", "vcpus": 1, "disk": "128M",
                                          "server": "cs1"})["id"])
            wait_booted(server_uri(cfg, "cs1"), vm)
            stream = EchoStream(connect_to(api.http.get(f"{api.url}/vms/{vm}", timeout=30).json()["ip"]))
            stream.start()
            mine, baseline = [], []
            for round_ in range(args.rounds):
                mine += [longest_gap_ms(stream, lambda: ours(api, vm, "cs2")),
                         longest_gap_ms(stream, lambda: ours(api, vm, "cs1"))]
                baseline += [longest_gap_ms(stream, lambda: direct(cfg, vm, "cs1", "cs2")),
                             longest_gap_ms(stream, lambda: direct(cfg, vm, "cs2", "cs1"))]
                print(f"round {round_ + 1}/{args.rounds}: ours {mine[-2]['migration_ms']:.0f}+{mine[-1]['migration_ms']:.0f} ms, "
                      f"direct {baseline[-2]['migration_ms']:.0f}+{baseline[-1]['migration_ms']:.0f} ms", flush=True)
            stream.stop()
            stream.sock.close()
            api.job_end(api.http.delete(f"{api.url}/vms/{vm}", timeout=30).json()["id"])
        finally:
            supervisor.stop_all()
    return report(args, mine, baseline)


def report(args: argparse.Namespace, mine: list[dict[str, float]], baseline: list[dict[str, float]]) -> dict[str, Any]:
    ours_time, direct_time = summary(mine, "migration_ms"), summary(baseline, "migration_ms")
    ours_down, direct_down = summary(mine, "downtime_ms"), summary(baseline, "downtime_ms")
    return {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]},
        "vm": {"template": "tiny", "memory_mib": 256, "idle": True},
        "live": sorted({sample["live"] for sample in mine + baseline}),
        "rounds": args.rounds,
        "migrations_each": len(mine),
        "ours": {key: summary(mine, key) for key in ("downtime_ms", "longest_gap_ms", "migration_ms", "overhead_ms",
                                                     "post_to_done_ms")},
        "direct_libvirt": {key: summary(baseline, key) for key in ("downtime_ms", "longest_gap_ms", "migration_ms")},
        "ratio_migration_time_p50": round(ours_time["p50"] / direct_time["p50"], 3) if direct_time else None,
        "ratio_downtime_p50": round(ours_down["p50"] / direct_down["p50"], 3) if ours_down and direct_down else None,
        "samples": {"ours": mine, "direct_libvirt": baseline},
    }


def print_report(results: dict[str, Any]) -> None:
    ours, direct_ = results["ours"], results["direct_libvirt"]
    how = {(True,): "live", (False,): "paused (TCG on QEMU before 9.0)"}.get(tuple(results["live"]), "live and paused")
    print(f"\n{results['migrations_each']} migrations each, {how}, of an idle 256 MiB tiny VM between cs1 and cs2")
    print(f"{'':24}{'ours p50':>12}{'ours max':>12}{'direct p50':>12}{'direct max':>12}")
    for key in ("downtime_ms", "longest_gap_ms", "migration_ms"):
        print(f"{key:24}{ours[key].get('p50', '-'):>12}{ours[key].get('max', '-'):>12}"
              f"{direct_[key].get('p50', '-'):>12}{direct_[key].get('max', '-'):>12}")
    for key in ("overhead_ms", "post_to_done_ms"):
        print(f"{key:24}{ours[key].get('p50', '-'):>12}{ours[key].get('max', '-'):>12}")
    print(f"migration time ours/direct (p50): {results['ratio_migration_time_p50']}")
    print(f"downtime ours/direct (p50): {results['ratio_downtime_p50']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="round trips cs1 -> cs2 -> cs1, each way ours and direct")
    args = parser.parse_args(argv)
    require_root_and("bench/migrate.py", (), "it brings up a lab of namespaces and libvirtds")
    return measure_and_report("migrate", lambda scratch: measure(args, scratch), print_report)


if __name__ == "__main__":
    sys.exit(main())
