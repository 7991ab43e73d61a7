"""HA: a server fails -> its VM answers again on another (detection, fencing, restart), beside a cold start (issue 14).

Brings up a lab of its own and a stack on it the way bench/migrate.py does, but with the services of
`laxcluster run` (`cli.services.celery_services`: one worker per queue, so cs1's node worker is a process
of its own, and beat, whose HA watcher ticks every `ha.check_every_s`), HA switched on with the packaged
timings unless overridden. It installs one idle 256 MiB `tiny` VM (ha on) on cs1 through the API. Then, per
round:

1. failure: cs1's libvirtd and its node worker are killed -9 while the guest's QEMU runs on (the orphan,
   as in tests/ha/test_ha_lab.py); t0 is that moment. Then, each against t0 (one machine, one wall clock):
   detection = the `recover-server` job's `created_at`; fenced = its `fence-server` child's `finished_at`;
   restarted = its `start` child's `finished_at`; answering = the moment a client in the root namespace
   gets a line back from the guest's echo service on cs2 over the VM network (the guest's console shell
   answered, the service was started on it, lab/echo.py).
2. baseline, while the orphan still runs (same load): the VM's domain on cs2 destroyed and undefined, then
   defined again from the XML the node worker had defined and created with libvirt-python; the time until
   it answers the same way. That is the floor HA cannot beat: starting the VM where it will run.
3. cs1 back: the orphan killed, the lab's missing daemons up (cs1's libvirtd), cs1's worker restarted,
   `POST /servers/cs1/actions/activate`, the watcher seen to hear cs1 again, and the VM live-migrated back
   to cs1 through the API.

Each boot of the guest runs its echo service on a port of its own: the orphan on cs1 keeps the same MAC
and address on the VM network (fencing is at the SAN only), so a reply on the new port proves it came from
the instance on cs2.

Prints p50 and every run of each phase, the ratio HA failure->answering / cold start->answering, writes
`bench/results/ha.json`, and stops every process it started and tears the lab down, also on failure, Ctrl-C
or SIGTERM.

Run (root): `.venv/bin/python bench/ha.py [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt
import redis
from benchkit import BenchError, booted_console, measure_and_report, moment, require_root_and, run_services
from migrate import (
    READY_TIMEOUT_S,
    Api,
    server_uri,
    stack_environment,
    start_stack,
    summary,
)

import config
from cli.services import Service, Supervisor
from lab import cluster as lab_cluster
from lab.echo import ECHO_PORT, ECHO_STARTED, START_ECHO, echo
from lab.processes import qemu_of, read_pidfile, stop, wait_until
from lab.testing import make_test_config, running_lab
from lab.topology import lab_dir
from tasks.node.heartbeat import silence_key, worker_key
from tasks.queues import node_queue

FAILED, SPARE = "cs1", "cs2"
RECOVERY_TIMEOUT_S = 300
ANSWER_TIMEOUT_S = 300
GOAL_ANSWERING_S = 60.0
PHASES = ("detection_s", "fencing_s", "restart_s", "boot_s", "failure_to_restarted_s", "failure_to_answering_s")
BASELINE = ("define_create_s", "cold_start_to_answering_s")


@dataclass
class HaBench:
    cfg: config.Config
    api: Api
    supervisor: Supervisor
    vm: str
    ip: str
    orphans: list[int] = field(default_factory=list)
    port: int = ECHO_PORT  # the echo port of the guest's latest boot

    def echo_port(self) -> int:
        """A port for the echo service of the guest's next boot, used by no earlier boot."""
        self.port += 1
        return self.port

    def node_worker(self) -> Service:
        return next(s for s in self.supervisor.running if s.name == f"worker {node_queue(FAILED)}")


def ha_environment(args: argparse.Namespace, lab_cfg_path: Path, workdir: Path) -> dict[str, str]:
    """The stack's environment with HA on (lab.testing switches it off); timings overridden only when asked."""
    env = stack_environment(lab_cfg_path, workdir)
    env["LAXCLUSTER_HA_ENABLED"] = "true"
    for key in ("failed_after_s", "check_every_s", "worker_ttl_s"):
        if getattr(args, key) is not None:
            env[f"LAXCLUSTER_HA_{key.upper()}"] = str(getattr(args, key))
    return env


def fail_cs1(bench: HaBench) -> float:
    """Kill -9 cs1's libvirtd and node worker (its whole process group); return when (wall clock)."""
    bench.orphans.extend(qemu_of(bench.vm))
    libvirtd = read_pidfile(lab_dir(bench.cfg) / FAILED / "pids" / "libvirtd.pid")
    if libvirtd is None:
        raise BenchError(f"no pidfile of {FAILED}'s libvirtd")
    worker = bench.node_worker()
    os.kill(libvirtd, signal.SIGKILL)
    os.killpg(worker.proc.pid, signal.SIGKILL)
    failed_at = time.time()
    worker.proc.wait(10)
    bench.supervisor.running.remove(worker)
    return failed_at


def echoed(ip: str, port: int) -> bool:
    line = b"ha-bench\n"
    try:
        with socket.create_connection((ip, port), timeout=2) as sock:
            sock.settimeout(5)
            return echo(sock, line) == line
    except OSError:
        return False


def answering(uri: str, vm: str, ip: str, port: int) -> float:
    """When (wall clock) a client first gets a line back from the guest: its console shell asked for the boot
    line until it answers (every 0.5 s), an echo service started on `port`, a line sent over the VM network."""
    with booted_console(uri, vm, ANSWER_TIMEOUT_S) as console:
        console.write(START_ECHO.replace(f"-p {ECHO_PORT} ", f"-p {port} ").encode() + b"\n")
        console.read_until(ECHO_STARTED, timeout=30)
    wait_until(lambda: echoed(ip, port), 60, f"{vm}'s echo service at {ip}:{port}", interval=0.1)
    return time.time()


def running_on(uri: str, vm: str) -> bool:
    conn = libvirt.open(uri)
    try:
        return bool(conn.lookupByName(vm).isActive())
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def recovery_since(api: Api, failed_at: float) -> dict[str, Any]:
    """The recover-server job of cs1 the watcher started after `failed_at`, once it succeeded."""
    def started() -> dict[str, Any] | None:
        # created_at has millisecond precision; a job of an earlier round is long before.
        return next((job for job in api.jobs("recover-server", f"recover/{FAILED}")
                     if moment(job["created_at"]) >= failed_at - 0.001), None)

    job = wait_until(started, RECOVERY_TIMEOUT_S, f"the watcher to start recovering {FAILED}", interval=0.2)
    return api.job_end(job["id"])


def child(api: Api, parent: dict[str, Any], kind: str, target: str) -> dict[str, Any]:
    found = [job for job in api.jobs(kind, target) if job["parent_id"] == parent["id"]]
    if len(found) != 1 or found[0]["state"] != "succeeded":
        raise BenchError(f"recover-server {parent['id']}: {kind} children {found}")
    return found[0]


def ha_round(bench: HaBench) -> dict[str, Any]:
    """Fail cs1; the phases until the VM answers on cs2, in seconds."""
    failed_at = fail_cs1(bench)
    spare, orphan_port = server_uri(bench.cfg, SPARE), bench.port
    wait_until(lambda: running_on(spare, bench.vm), RECOVERY_TIMEOUT_S, f"{bench.vm} to run on {SPARE}", interval=0.2)
    answered = answering(spare, bench.vm, bench.ip, bench.echo_port())
    # Fencing is at the SAN only: does the old guest, same MAC and address, still answer its clients?
    orphan_answers = echoed(bench.ip, orphan_port)
    recovery = recovery_since(bench.api, failed_at)
    if recovery["result"].get("restarted") != {bench.vm: SPARE}:
        raise BenchError(f"recover-server restarted {recovery['result'].get('restarted')}, not {bench.vm} on {SPARE}")
    fence, start = child(bench.api, recovery, "fence-server", FAILED), child(bench.api, recovery, "start", bench.vm)
    detected, fenced, restarted = moment(recovery["created_at"]), moment(fence["finished_at"]), moment(start["finished_at"])
    return {"detection_s": detected - failed_at, "fencing_s": fenced - detected, "restart_s": restarted - fenced,
            "boot_s": answered - restarted, "failure_to_restarted_s": restarted - failed_at,
            "failure_to_answering_s": answered - failed_at,
            "sessions_dropped": recovery["result"].get("sessions_dropped"), "signals": recovery["result"]["signals"],
            "orphan_answers": orphan_answers,
            "jobs": {job["kind"]: {key: job[key] for key in ("created_at", "started_at", "finished_at")}
                     for job in (recovery, fence, start)}}


def cold_start(bench: HaBench) -> dict[str, float]:
    """The baseline: the VM's domain on cs2 defined again and created with libvirt-python, until it answers."""
    conn = libvirt.open(server_uri(bench.cfg, SPARE))
    try:
        domain = conn.lookupByName(bench.vm)
        xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)  # what the node worker defined at the restart
        domain.destroy()
        domain.undefine()
        started = time.time()
        conn.defineXML(xml).create()
        created = time.time()
    finally:
        conn.close()
    answered = answering(server_uri(bench.cfg, SPARE), bench.vm, bench.ip, bench.echo_port())
    return {"define_create_s": created - started, "cold_start_to_answering_s": answered - started}


def restart_node_worker(bench: HaBench, name: str, argv: list[str], log: Path) -> None:
    offset = log.stat().st_size if log.exists() else 0  # the log is appended to: only a new " ready." counts
    bench.supervisor.start(Service(name, argv, log))
    wait_until(lambda: " ready." in log.read_text()[offset:], READY_TIMEOUT_S, f"{name} to be ready again", interval=0.2)


def bring_back_cs1(bench: HaBench, worker: Service) -> None:
    """The orphan gone, cs1's libvirtd and worker up, cs1 activated and heard by the watcher, the VM back on it."""
    stop(list(bench.orphans), first=signal.SIGKILL)
    bench.orphans.clear()
    lab_cluster.up(bench.cfg)
    restart_node_worker(bench, worker.name, worker.argv, worker.log)
    bench.api.job_end(bench.api.post(f"/servers/{FAILED}/actions/activate", {})["id"])
    # The activation made the watcher forget cs1's silence; its heartbeat must be back before cs1 fails again,
    # or the next round's detection would start from a server already silent.
    client = redis.Redis.from_url(bench.cfg.redis_url)
    try:
        wait_until(lambda: client.exists(worker_key(FAILED)) and not client.exists(silence_key(FAILED)),
                   READY_TIMEOUT_S, f"the watcher to hear {FAILED} again", interval=0.2)
    finally:
        client.close()
    bench.api.job_end(bench.api.post(f"/vms/{bench.vm}/actions/migrate", {"to": FAILED})["id"])


def one_round(bench: HaBench, number: int, rounds: int) -> tuple[dict[str, Any], dict[str, float]]:
    worker = bench.node_worker()
    ours = ha_round(bench)
    baseline = cold_start(bench)
    bring_back_cs1(bench, worker)
    print(f"round {number}/{rounds}: failure -> answering {ours['failure_to_answering_s']:.1f} s (detection "
          f"{ours['detection_s']:.1f}, fencing {ours['fencing_s']:.1f}, restart {ours['restart_s']:.1f}, boot "
          f"{ours['boot_s']:.1f}; old guest answers: {ours['orphan_answers']}); cold start -> answering {baseline['cold_start_to_answering_s']:.1f} s", flush=True)
    return ours, baseline


@contextmanager
def orphans_killed(bench: HaBench) -> Iterator[HaBench]:
    """QEMUs whose libvirtd died are known to no libvirtd that could stop them: kill them, whatever happened."""
    try:
        yield bench
    finally:
        stop(bench.orphans, first=signal.SIGKILL)


def install(cfg: config.Config, api: Api, supervisor: Supervisor) -> HaBench:
    """The VM on cs1 (ha on), answering; the bench's state around it."""
    vm = f"bench-{secrets.token_hex(2)}"
    api.job_end(api.post("/vms", {"name": vm, "template": "tiny", "memory": "256M", "vcpus": 1, "disk": "128M",
                                  "server": FAILED, "ha": True})["id"])
    ip = api.http.get(f"{api.url}/vms/{vm}", timeout=30).json()["ip"]
    bench = HaBench(cfg, api, supervisor, vm, ip)
    answering(server_uri(cfg, FAILED), vm, ip, bench.echo_port())
    return bench


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    (workdir / "lab").mkdir()
    lab_cfg_path = make_test_config(workdir / "lab")
    supervisor = Supervisor(ha_environment(args, lab_cfg_path, workdir))
    with running_lab(lab_cfg_path):
        try:
            cfg, api = start_stack(supervisor, run_services)
            with orphans_killed(install(cfg, api, supervisor)) as bench:
                runs = [one_round(bench, number, args.rounds) for number in range(1, args.rounds + 1)]
                api.job_end(api.http.delete(f"{api.url}/vms/{bench.vm}", timeout=30).json()["id"])
        finally:
            supervisor.stop_all()
    return report(args, cfg.section("ha"), [ours for ours, _ in runs], [baseline for _, baseline in runs])


def report(args: argparse.Namespace, ha: dict[str, Any], ours: list[dict[str, Any]],
           baseline: list[dict[str, float]]) -> dict[str, Any]:
    phases = {key: summary(ours, key, digits=2) for key in PHASES}
    floor = {key: summary(baseline, key, digits=2) for key in BASELINE}
    ratio = statistics.median(s["failure_to_answering_s"] for s in ours) / statistics.median(
        s["cold_start_to_answering_s"] for s in baseline)
    # The latest detection the settings allow: the heartbeat key outlives the worker by up to worker_ttl_s,
    # the watcher notices the silence at a tick and declares the failure at the first tick after failed_after_s.
    bound = float(ha["worker_ttl_s"]) + float(ha["failed_after_s"]) + 2 * float(ha["check_every_s"])
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]},
        "vm": {"template": "tiny", "memory_mib": 256, "idle": True},
        "ha": {key: ha[key] for key in ("failed_after_s", "check_every_s", "worker_ttl_s")},
        "rounds": args.rounds,
        "ours": phases,
        "cold_start": floor,
        "ratio_failure_vs_cold_start_p50": round(ratio, 2),
        "detection_bound_s": bound,
        "orphan_answered_rounds": sum(1 for s in ours if s["orphan_answers"]),
        "goals": {
            "failure_to_answering_p50_under_60s": {"value": phases["failure_to_answering_s"]["p50"],
                                                   "met": phases["failure_to_answering_s"]["p50"] < GOAL_ANSWERING_S},
            "detection_p50_under_60s": {"value": phases["detection_s"]["p50"],
                                        "met": phases["detection_s"]["p50"] < GOAL_ANSWERING_S},
            "detection_max_within_settings": {"value": phases["detection_s"]["max"], "bound": bound,
                                              "met": phases["detection_s"]["max"] <= bound},
        },
        "samples": {"ours": [rounded(s) for s in ours], "cold_start": [rounded(s) for s in baseline]},
    }


def rounded(sample: dict[str, Any]) -> dict[str, Any]:
    return {key: round(value, 2) if isinstance(value, float) else value for key, value in sample.items()}


def print_report(results: dict[str, Any]) -> None:
    ha, ours, floor = results["ha"], results["ours"], results["cold_start"]
    print(f"\n{results['rounds']} failures of cs1 (libvirtd + node worker killed -9), one idle 256 MiB tiny VM; "
          f"ha: failed_after_s {ha['failed_after_s']}, check_every_s {ha['check_every_s']}, worker_ttl_s {ha['worker_ttl_s']}")
    print(f"{'':28}{'p50 s':>8}{'min':>8}{'max':>8}   runs")
    for key, samples in [*((k, "ours") for k in PHASES), *((k, "cold_start") for k in BASELINE)]:
        figures = (ours if samples == "ours" else floor)[key]
        runs = " ".join(f"{s[key]:.2f}" for s in results["samples"][samples])
        print(f"{key:28}{figures['p50']:>8}{figures['min']:>8}{figures['max']:>8}   {runs}")
    print(f"failure -> answering / cold start -> answering (p50): {results['ratio_failure_vs_cold_start_p50']}")
    print(f"detection bound from the settings: {results['detection_bound_s']} s")
    print(f"rounds in which the old guest on {FAILED} still answered over the VM network: "
          f"{results['orphan_answered_rounds']} of {results['rounds']}")
    for name, goal in results["goals"].items():
        print(f"goal {name}: {goal['value']} -> {'met' if goal['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 6), help="failures of cs1 (1-5)")
    parser.add_argument("--failed-after-s", type=int, help="ha.failed_after_s (default: the packaged config's)")
    parser.add_argument("--check-every-s", type=float, help="ha.check_every_s (default: the packaged config's)")
    parser.add_argument("--worker-ttl-s", type=int, help="ha.worker_ttl_s (default: the packaged config's)")
    args = parser.parse_args(argv)
    require_root_and("bench/ha.py", (), "it brings up a lab of namespaces and libvirtds")
    return measure_and_report("ha", lambda scratch: measure(args, scratch), print_report)


if __name__ == "__main__":
    sys.exit(main())
