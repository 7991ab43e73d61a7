"""DR replication: RPO, bytes shipped against bytes changed, the guest's write latency, failover and failback (issue 13).

Brings up a lab of its own (site-a: san-a, cs1, cs2; site-b: san-b, cs3) and the services of `laxcluster run`
on it the way bench/ha.py does (a worker per queue, and beat, whose dispatcher starts the continuous ships), and
installs one 256 MiB `tiny` VM on cs1 through the API. Its guest writes continuously: through its serial console
a loop is started that, once a second, does `rate / write size` writes of `--write-kib` random bytes at random
4 KiB-aligned offsets of a `--file-mib` file on its disk, each a `dd ... conv=fsync` (durable), and logs each
batch's duration (/proc/uptime, 10 ms steps) to a tmpfs file read back over the console when it stops. Then:

1. write latency without replication: the writer for `--without-s` seconds, no replication configured;
2. continuous replication (`POST /vms/<vm>/replication`, `--rpo-target-s`), the first (full) ship awaited, then
   the writer for `--minutes` while `GET /vms/<vm>/replication` is sampled every second (RPO); the writer stops,
   one more point is awaited, and the ships of the period (their points after the full one, up to that one) are
   summed: bytes changed (64 KiB-aligned ranges), bytes sent (zstd on the wire), against what the guest wrote;
   the write latency of the period beside step 1's;
3. baseline for the failovers: the VM's own restart through the API (shutdown, start) until its console shell
   answers, the writer running, as a failover does it;
4. planned failover to cs3 (writer running): POST -> job succeeded -> guest answering on cs3; the writer runs
   `--site-b-s` there; failback (home to site-a): its bytes changed and sent against what the guest wrote at site-b;
5. unplanned failover: every process of site-a's hosts (san-a, cs1, cs2: daemons and guests) killed -9 while the
   guest writes, then at once `failover {"planned": false}`: POST -> succeeded ->
   answering on cs3, and how old the point it started from was when site-a died; the writer runs `--site-b-s`,
   site-a comes back (`lab up`, `check --repair` for cs1's stale domain), failback as in 4.

The baselines beside our figures: write latency without replication; a full copy of the VM's replicated volumes
(the first ship, measured here, and their allocated size) beside an incremental ship; the restart beside each
failover. Prints them with ratios, writes `bench/results/replicate.json` with `goals` and `met`, and stops every
process it started and tears the lab down, also on failure, Ctrl-C or SIGTERM.

Run (root): `.venv/bin/python bench/replicate.py [--minutes 5]`; `--minutes 1` for a quick look (about 6 min).
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import re
import secrets
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt
from benchkit import BenchError, booted_console, measure_and_report, moment, require_root_and, run_services
from migrate import Api, server_uri, stack_environment, start_stack

import config
from cli.services import Supervisor
from lab import cluster as lab_cluster
from lab import netns
from lab.processes import stop, wait_until
from lab.testing import make_test_config, running_lab
from lab.topology import build
from tasks.inventory.dr import REPLICATED_ROLES
from tasks.san.storage import backend_for
from workers.node.console import SerialConsole, start_event_loop

HOME, DR_SERVER, HOME_SITE = "cs1", "cs3", "site-a"
DISK = "128M"  # the tiny root filesystem stays 64 MiB whatever the disk's size
ANSWER_TIMEOUT_S = 300
SHIP_TIMEOUT_S = 300
SETTLE_S = 5  # the writer runs this long before a restart or failover, so a ship or two see it
BENCH_FILE = "/root/bench"  # on the VM's disk: what replication ships
# In the guest's /tmp, a tmpfs: the writer's own files add nothing to the disk.
WRITER, WRITER_LOG, WRITER_PID = "/tmp/writer.sh", "/tmp/writer.log", "/tmp/writer.pid"
# One batch a second: $3 writes, each $2 4 KiB blocks of random bytes at a random block of the $1-block file, each
# dd fsync'd; the batch timed with /proc/uptime (busybox date has no %N); a log line per batch: start end writes.
WRITER_SCRIPT = f"""n=$1 k=$2 w=$3
while :; do
read a _ </proc/uptime
i=0
while [ $i -lt $w ]; do
dd if=/dev/urandom of={BENCH_FILE} bs=4k count=$k seek=$((RANDOM % (n - k + 1))) conv=notrunc,fsync 2>/dev/null
i=$((i + 1))
done
read b _ </proc/uptime
a=${{a%.*}}${{a#*.}} b=${{b%.*}}${{b#*.}}
echo "$a $b $w" >>{WRITER_LOG}
[ $((b - a)) -lt 100 ] && usleep $(((100 - b + a) * 10000))
done
"""


@dataclass(frozen=True)
class Workload:
    """What the guest writes: `rate_mib_s` a second as fsync'd writes of `write_kib` at random 4 KiB-aligned offsets
    of a `file_mib` file."""

    rate_mib_s: float
    write_kib: int
    file_mib: int

    @property
    def blocks_per_write(self) -> int:
        return self.write_kib // 4

    @property
    def writes_per_batch(self) -> int:
        return max(1, round(self.rate_mib_s * 1024 / self.write_kib))


@dataclass(frozen=True)
class Batch:
    """One second's writes of the guest's writer, its start and end in the guest's centiseconds of uptime."""

    start_cs: int
    end_cs: int
    writes: int


@dataclass
class DrBench:
    """The VM under test, the stack that runs it, what its guest writes."""

    cfg: config.Config
    api: Api
    vm: str
    workload: Workload

    def server(self) -> str:
        return self.api.http.get(f"{self.api.url}/vms/{self.vm}", timeout=30).json()["server"]

    def uri(self) -> str:
        return server_uri(self.cfg, self.server())

    def status(self) -> dict[str, Any]:
        return self.api.http.get(f"{self.api.url}/vms/{self.vm}/replication", timeout=30).json()


# -- the guest ----------------------------------------------------------------------------------------------------

def in_guest(uri: str, vm: str, command: str, answer: str, timeout: float = 60) -> re.Match[str]:
    """Send one line to the guest's console shell; the match of `answer`, a pattern the echoed line cannot match
    (the command prints it with $((...)))."""
    start_event_loop()
    conn = libvirt.open(uri)
    try:
        with SerialConsole(conn.lookupByName(vm)) as console:
            console.write(command.encode() + b"\n")
            return console.read_until(answer, timeout)
    finally:
        conn.close()


def answered_at(uri: str, vm: str) -> float:
    """When (wall clock) the guest's console shell first answers with its boot line."""
    with booted_console(uri, vm, ANSWER_TIMEOUT_S):
        return time.time()


def fill_file(bench: DrBench) -> None:
    """The file the writer writes into, allocated once with random bytes (nothing of it compresses)."""
    size = bench.workload.file_mib
    command = (f"[ -f {BENCH_FILE} ] || dd if=/dev/urandom of={BENCH_FILE} bs=1M count={size} 2>/dev/null; sync; "
               f"echo filled-$(($(wc -c <{BENCH_FILE}) >> 20))")
    filled = int(in_guest(bench.uri(), bench.vm, command, r"filled-(\d+)", timeout=300)[1])
    if filled != size:
        raise BenchError(f"the guest's {BENCH_FILE} has {filled} MiB, not {size} (is its root filesystem full?)")


def start_writer(bench: DrBench) -> None:
    """The writer loop in the background of the guest's shell, its log empty (the script is sent each time: /tmp
    is gone after a boot)."""
    uri, work = bench.uri(), bench.workload
    script = base64.b64encode(WRITER_SCRIPT.encode()).decode()
    in_guest(uri, bench.vm, f"echo {script} | base64 -d >{WRITER}; echo script-$((2+3))", r"script-5")
    blocks = work.file_mib * 256
    in_guest(uri, bench.vm, f": >{WRITER_LOG}; sh {WRITER} {blocks} {work.blocks_per_write} {work.writes_per_batch} "
                            f">/dev/null 2>&1 & echo $! >{WRITER_PID}; echo writer-$((1+1))", r"writer-2")


def stop_writer(bench: DrBench) -> list[Batch]:
    """Stop the writer; the batches it logged."""
    command = (f"kill $(cat {WRITER_PID}) 2>/dev/null; rm -f {WRITER_PID}; echo log-$((5+6)); cat {WRITER_LOG}; "
               "echo end-$((7+8))")
    log = in_guest(bench.uri(), bench.vm, command, r"(?s)log-11\s(.*?)end-15")[1]
    return [Batch(int(a), int(b), int(w)) for a, b, w in re.findall(r"^(\d+) (\d+) (\d+)\r?$", log, re.MULTILINE)]


def write_for(bench: DrBench, seconds: float) -> list[Batch]:
    start_writer(bench)
    time.sleep(seconds)
    return stop_writer(bench)


def bytes_written(workload: Workload, batches: list[Batch]) -> int:
    return sum(b.writes for b in batches) * workload.write_kib * 1024


def writer_figures(workload: Workload, batches: list[Batch]) -> dict[str, Any]:
    """What the guest wrote and how long a write took (a batch's duration over its writes: the 10 ms steps of
    /proc/uptime are spread over the batch)."""
    written = bytes_written(workload, batches)
    elapsed = (batches[-1].end_cs - batches[0].start_cs) / 100 if batches else 0
    return {"batches": len(batches), "bytes_written": written,
            "rate_mib_s": round(written / elapsed / 2**20, 2) if elapsed else None,
            "write_ms": spread([(b.end_cs - b.start_cs) * 10 / b.writes for b in batches])}


# -- replication --------------------------------------------------------------------------------------------------

def seq(point: str) -> int:
    return int(point.removeprefix("rep-"))


def point_after(bench: DrBench, moment_s: float) -> dict[str, Any]:
    """The VM's newest replica point once one was taken after `moment_s` (wall clock)."""
    def newer() -> dict[str, Any] | None:
        points = bench.status()["points"]
        return points[0] if points and moment(points[0]["taken_at"]) > moment_s else None

    return wait_until(newer, SHIP_TIMEOUT_S, f"a replica point of {bench.vm} taken after {moment_s:.0f}", interval=0.5)


def watch_rpo(bench: DrBench, seconds: float) -> list[dict[str, Any]]:
    """`GET /vms/<vm>/replication` once a second for `seconds`: the RPO and state each time."""
    samples, end = [], time.monotonic() + seconds
    while (asked := time.monotonic()) < end:
        status = bench.status()
        samples.append({"at": round(time.time(), 2), "rpo_s": status["rpo_s"], "state": status["state"]})
        time.sleep(max(0.0, 1 - (time.monotonic() - asked)))
    return samples


def ships_between(bench: DrBench, first: str, last: str, since: float) -> tuple[list[dict[str, Any]], int]:
    """The results of the replicate-to-dr jobs whose points follow `first` up to `last`, and how many ships failed
    after `since` (a failed ship's changes go with the next one)."""
    jobs = bench.api.jobs("replicate-to-dr", bench.vm, limit=500)
    shipped = [job["result"] for job in jobs if job["state"] == "succeeded" and seq(first) < seq(job["result"]["point"]) <= seq(last)]
    failed = sum(1 for job in jobs if job["state"] == "failed" and moment(job["created_at"]) > since)
    return sorted(shipped, key=lambda result: seq(result["point"])), failed


def volumes_bytes(bench: DrBench) -> dict[str, int]:
    """Size and allocated bytes of the VM's replicated volumes where it runs (the reflink pool's files)."""
    volumes = [v for v in bench.api.http.get(f"{bench.api.url}/vms/{bench.vm}", timeout=30).json()["volumes"]
               if v["role"] in REPLICATED_ROLES]
    paths = [backend_for(bench.cfg.san(v["san"])[1]).path_for_export(v["backend_handle"]) for v in volumes]
    return {"size_bytes": sum(v["size_bytes"] for v in volumes),
            "allocated_bytes": sum(os.stat(path).st_blocks * 512 for path in paths)}


def continuous(bench: DrBench, args: argparse.Namespace) -> dict[str, Any]:
    """Replication switched on; the guest writes for `--minutes` while the RPO is sampled; the ships of that time."""
    body: dict[str, Any] = {"mode": "continuous", "rpo_target_s": args.rpo_target_s}
    if args.bandwidth_limit:
        body["bandwidth_limit"] = args.bandwidth_limit
    full = bench.api.job_end(bench.api.post(f"/vms/{bench.vm}/replication", body)["id"])["result"]
    print(f"first (full) ship: {mib(full['bytes_changed'])} MiB changed, {mib(full['bytes_sent'])} MiB sent "
          f"in {full['seconds']:.1f} s; writing for {args.minutes:g} min", flush=True)
    started = time.time()
    start_writer(bench)
    rpo = watch_rpo(bench, args.minutes * 60)
    batches = stop_writer(bench)
    last = point_after(bench, time.time())
    ships, failed = ships_between(bench, full["point"], last["name"], started)
    return {"full": full, "rpo": rpo, "batches": batches, "ships": ships, "failed_ships": failed,
            "volumes": volumes_bytes(bench)}


# -- failover and failback ----------------------------------------------------------------------------------------

def restart(bench: DrBench) -> dict[str, Any]:
    """The baseline: the VM shut down and started again through the API, the writer running, until it answers."""
    start_writer(bench)
    time.sleep(SETTLE_S)
    posted = time.time()
    bench.api.job_end(bench.api.post(f"/vms/{bench.vm}/actions/shutdown", {})["id"])
    stopped = time.time()
    bench.api.job_end(bench.api.post(f"/vms/{bench.vm}/actions/start", {})["id"])
    started = time.time()
    answered = answered_at(bench.uri(), bench.vm)
    return {"shutdown_s": stopped - posted, "post_to_succeeded_s": started - posted,
            "post_to_answering_s": answered - posted, "server": bench.server()}


def failover(bench: DrBench, planned: bool) -> dict[str, Any]:
    """`POST /vms/<vm>/failover` until the job succeeded and the guest answers at the DR site."""
    posted = time.time()
    job = bench.api.job_end(bench.api.post(f"/vms/{bench.vm}/failover", {"planned": planned})["id"])
    ended = time.time()
    answered = answered_at(server_uri(bench.cfg, job["result"]["server"]), bench.vm)
    return {"post_to_succeeded_s": ended - posted, "post_to_answering_s": answered - posted,
            "server": job["result"]["server"], "point": job["result"]["point"],
            "point_taken_at": job["result"]["point_taken_at"]}


def failback(bench: DrBench, written_at_dr: list[Batch]) -> dict[str, Any]:
    """Home again: what the failback shipped beside what the guest wrote at the DR site."""
    posted = time.time()
    result = bench.api.job_end(bench.api.post(f"/vms/{bench.vm}/failback", {})["id"])["result"]
    ended = time.time()
    answered = answered_at(server_uri(bench.cfg, result["server"]), bench.vm)
    return {"post_to_succeeded_s": ended - posted, "post_to_answering_s": answered - posted, "server": result["server"],
            "bytes_changed": result["bytes_changed"], "bytes_sent": result["bytes_sent"],
            "guest_bytes_written": bytes_written(bench.workload, written_at_dr), "guest_batches": len(written_at_dr)}


def planned_round(bench: DrBench, site_b_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    start_writer(bench)
    time.sleep(SETTLE_S)
    over = failover(bench, planned=True)
    print(f"planned failover: POST -> succeeded {over['post_to_succeeded_s']:.1f} s, -> answering on "
          f"{over['server']} {over['post_to_answering_s']:.1f} s", flush=True)
    back = failback(bench, write_for(bench, site_b_s))
    print(f"failback: {mib(back['bytes_sent'])} MiB sent for {mib(back['guest_bytes_written'])} MiB written at site-b",
          flush=True)
    return over, back


def kill_site_a(cfg: config.Config) -> float:
    """Every process in the namespaces of site-a's SAN and servers (tgtd, sshd, libvirtds, guests) killed -9, as
    a site losing power; when (wall clock). The Celery workers run in the root namespace and stay up."""
    hosts = [host for host in build(cfg).hosts if host.site == HOME_SITE and host.kind in ("server", "san")]
    pids = [pid for host in hosts for pid in netns.netns_pids(host.netns)]
    killed = time.time()
    stop(pids, first=signal.SIGKILL)
    return killed


def unplanned_round(bench: DrBench, site_b_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Site-a dies while the guest writes (with a point or two since it started); failover from the newest point;
    the guest writes at site-b; site-a back, cs1's stale domain repaired away; failback."""
    start_writer(bench)
    for _ in range(2):
        point_after(bench, time.time())
    killed = kill_site_a(bench.cfg)
    over = failover(bench, planned=False)
    over["point_age_at_kill_s"] = killed - moment(over["point_taken_at"])
    print(f"unplanned failover: POST -> succeeded {over['post_to_succeeded_s']:.1f} s, -> answering on "
          f"{over['server']} {over['post_to_answering_s']:.1f} s; its point was taken "
          f"{over['point_age_at_kill_s']:.1f} s before site-a died", flush=True)
    at_dr = write_for(bench, site_b_s)
    lab_cluster.up(bench.cfg)
    over["repair"] = repair(bench)
    back = failback(bench, at_dr)
    print(f"failback: {mib(back['bytes_sent'])} MiB sent for {mib(back['guest_bytes_written'])} MiB written at site-b",
          flush=True)
    return over, back


def repair(bench: DrBench) -> dict[str, Any]:
    """`check --repair` once site-a is back (cs1 kept the stale domain); what it found, not a reason to stop."""
    job = bench.api.post("/check", {"repair": True})
    try:
        result = bench.api.job_end(job["id"])["result"] or {}
    except BenchError as error:
        return {"error": str(error)}
    return {"drifts": len(result.get("drifts", []))}


# -- the run ------------------------------------------------------------------------------------------------------

def install(cfg: config.Config, api: Api, workload: Workload) -> DrBench:
    """The VM on cs1, booted, its file to write into allocated."""
    vm = f"bench-{secrets.token_hex(2)}"
    api.job_end(api.post("/vms", {"name": vm, "template": "tiny", "memory": "256M", "vcpus": 1, "disk": DISK,
                                  "server": HOME})["id"])
    bench = DrBench(cfg, api, vm, workload)
    answered_at(bench.uri(), vm)
    fill_file(bench)
    return bench


def run_phases(bench: DrBench, args: argparse.Namespace) -> dict[str, Any]:
    without = write_for(bench, args.without_s)
    print(f"without replication: {len(without)} batches", flush=True)
    period = continuous(bench, args)
    baseline = restart(bench)
    print(f"restart (shutdown, start) -> answering: {baseline['post_to_answering_s']:.1f} s", flush=True)
    planned, planned_back = planned_round(bench, args.site_b_s)
    unplanned, unplanned_back = unplanned_round(bench, args.site_b_s)
    bench.api.job_end(bench.api.http.delete(f"{bench.api.url}/vms/{bench.vm}/replication", timeout=30).json()["id"])
    bench.api.job_end(bench.api.http.delete(f"{bench.api.url}/vms/{bench.vm}", timeout=30).json()["id"])
    return {"without": without, "period": period, "restart": baseline, "planned": planned,
            "unplanned": unplanned, "failbacks": [{"after": "planned", **planned_back},
                                                  {"after": "unplanned", **unplanned_back}]}


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    (workdir / "lab").mkdir()
    lab_cfg_path = make_test_config(workdir / "lab")
    env = stack_environment(lab_cfg_path, workdir)
    if args.interval_s is not None:
        env["LAXCLUSTER_REPLICATION_CONTINUOUS_INTERVAL_S"] = str(args.interval_s)
    supervisor = Supervisor(env)
    workload = Workload(args.rate_mib_s, args.write_kib, args.file_mib)
    with running_lab(lab_cfg_path):
        try:
            cfg, api = start_stack(supervisor, run_services)
            raw = run_phases(install(cfg, api, workload), args)
        finally:
            supervisor.stop_all()
    return report(args, cfg.section("replication"), workload, raw)


# -- the report ---------------------------------------------------------------------------------------------------

def spread(values: list[float], digits: int = 1) -> dict[str, float]:
    """p50, p99 (nearest rank), min, max and n of `values`."""
    ordered = sorted(values)
    if not ordered:
        return {}

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], digits)

    return {"p50": rank(0.5), "p99": rank(0.99), "min": round(ordered[0], digits), "max": round(ordered[-1], digits),
            "n": len(ordered)}


def mib(count: float) -> float:
    return round(count / 2**20, 2)


def ratio(ours: float | None, baseline: float | None) -> float | None:
    return round(ours / baseline, 3) if ours is not None and baseline else None


def ship_figures(guest_written: int, period: dict[str, Any]) -> dict[str, Any]:
    ships, full = period["ships"], period["full"]
    changed, sent = sum(s["bytes_changed"] for s in ships), sum(s["bytes_sent"] for s in ships)
    per_ship = sent / len(ships) if ships else None
    return {"n": len(ships), "failed": period["failed_ships"], "bytes_changed": changed, "bytes_sent": sent,
            "guest_bytes_written": guest_written, "ratio_sent_vs_changed": ratio(sent, changed),
            "ratio_changed_vs_written": ratio(changed, guest_written), "sent_per_ship_mean": per_ship and round(per_ship),
            "seconds": spread([s["seconds"] for s in ships], 2),
            "full_copy": {"first_ship_bytes_changed": full["bytes_changed"], "first_ship_bytes_sent": full["bytes_sent"],
                          "first_ship_seconds": full["seconds"], **period["volumes"]},
            "ratio_ship_vs_full_ship": ratio(per_ship, full["bytes_sent"]),
            "ratio_ship_vs_allocated": ratio(per_ship, period["volumes"]["allocated_bytes"])}


def failover_figures(over: dict[str, Any], restart_: dict[str, Any]) -> dict[str, Any]:
    return {**rounded(over), "ratio_answering_vs_restart": ratio(over["post_to_answering_s"],
                                                                 restart_["post_to_answering_s"])}


def rounded(sample: dict[str, Any]) -> dict[str, Any]:
    return {key: round(value, 2) if isinstance(value, float) else value for key, value in sample.items()}


def report(args: argparse.Namespace, replication: dict[str, Any], workload: Workload, raw: dict[str, Any]
           ) -> dict[str, Any]:
    period = raw["period"]
    rpo = spread([s["rpo_s"] for s in period["rpo"] if s["rpo_s"] is not None])
    ships = ship_figures(bytes_written(workload, period["batches"]), period)
    without, with_ = writer_figures(workload, raw["without"]), writer_figures(workload, period["batches"])
    failbacks = [{**rounded(back), "ratio_sent_vs_written": ratio(back["bytes_sent"], back["guest_bytes_written"]),
                  "ratio_sent_vs_disk": ratio(back["bytes_sent"], period["volumes"]["size_bytes"]),
                  "ratio_sent_vs_full_ship": ratio(back["bytes_sent"], period["full"]["bytes_sent"])}
                 for back in raw["failbacks"]]
    results = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]},
        "vm": {"template": "tiny", "memory_mib": 256, "disk": DISK},
        "workload": {**asdict(workload), "writes_per_batch": workload.writes_per_batch, "fsync_each_write": True},
        "replication": {"mode": "continuous", "rpo_target_s": args.rpo_target_s, "minutes": args.minutes,
                        "bandwidth_limit": args.bandwidth_limit,
                        **{key: replication[key] for key in ("continuous_interval_s", "dispatch_every_s")}},
        "rpo_s": rpo,
        "rpo_states": {state: sum(1 for s in period["rpo"] if s["state"] == state)
                       for state in sorted({s["state"] for s in period["rpo"]})},
        "ships": ships,
        "write_latency": {"without_replication": without, "with_replication": with_,
                          "ratio_p50": ratio(with_["write_ms"].get("p50"), without["write_ms"].get("p50")),
                          "ratio_p99": ratio(with_["write_ms"].get("p99"), without["write_ms"].get("p99"))},
        "restart": rounded(raw["restart"]),
        "planned_failover": failover_figures(raw["planned"], raw["restart"]),
        "unplanned_failover": failover_figures(raw["unplanned"], raw["restart"]),
        "failbacks": failbacks,
        "samples": {"rpo": period["rpo"], "ships": period["ships"]},
    }
    results["goals"] = goals(results, args.rpo_target_s)
    return results


def goals(results: dict[str, Any], target: float) -> dict[str, Any]:
    rpo, ships = results["rpo_s"], results["ships"]
    allocated = ships["full_copy"]["allocated_bytes"]
    failback_max = max(back["bytes_sent"] for back in results["failbacks"])
    return {
        "rpo_p99_under_target": {"value": rpo.get("p99"), "target": target,
                                 "met": rpo.get("p99") is not None and rpo["p99"] < target},
        "bytes_sent_at_most_1_1x_changed": {"value": ships["ratio_sent_vs_changed"],
                                            "met": ships["bytes_sent"] <= 1.1 * ships["bytes_changed"]},
        # A failback that copied the disks would send at least their allocated bytes; one that ships the deltas
        # sends what changed at site-b, which the workload keeps well below that.
        "failback_sent_below_a_full_copy": {"value": failback_max, "bound": allocated,
                                            "met": failback_max < allocated},
    }


def print_report(results: dict[str, Any]) -> None:
    work, rep, rpo, ships = results["workload"], results["replication"], results["rpo_s"], results["ships"]
    print(f"\ncontinuous replication for {rep['minutes']:g} min (target {rep['rpo_target_s']} s, a ship "
          f"{rep['continuous_interval_s']} s after the last began); the guest writes {work['rate_mib_s']} MiB/s as "
          f"fsync'd {work['write_kib']} KiB writes at random offsets of a {work['file_mib']} MiB file")
    print(f"RPO s: p50 {rpo.get('p50')}  p99 {rpo.get('p99')}  max {rpo.get('max')}  ({rpo.get('n')} samples, "
          f"states {results['rpo_states']}); p99 / target {ratio(rpo.get('p99'), rep['rpo_target_s'])}")
    print(f"ships: {ships['n']} ({ships['failed']} failed), each {ships['seconds'].get('p50')} s (p50); changed "
          f"{mib(ships['bytes_changed'])} MiB, sent {mib(ships['bytes_sent'])} MiB: sent/changed "
          f"{ships['ratio_sent_vs_changed']}; the guest wrote {mib(ships['guest_bytes_written'])} MiB: "
          f"changed/written {ships['ratio_changed_vs_written']}")
    full = ships["full_copy"]
    print(f"per ship sent {mib(ships['sent_per_ship_mean'] or 0)} MiB vs a full ship {mib(full['first_ship_bytes_sent'])}"
          f" MiB: {ships['ratio_ship_vs_full_ship']}; vs the volumes' allocated {mib(full['allocated_bytes'])} MiB: "
          f"{ships['ratio_ship_vs_allocated']}")
    lat = results["write_latency"]
    without, with_ = lat["without_replication"]["write_ms"], lat["with_replication"]["write_ms"]
    print(f"guest write ms (fsync'd, p50/p99): without replication {without.get('p50')}/{without.get('p99')}, with "
          f"{with_.get('p50')}/{with_.get('p99')}: ratio p50 {lat['ratio_p50']}, p99 {lat['ratio_p99']}")
    print(f"{'':22}{'POST->succeeded s':>19}{'POST->answering s':>19}{'vs restart':>12}")
    print(f"{'restart (baseline)':22}{results['restart']['post_to_succeeded_s']:>19}"
          f"{results['restart']['post_to_answering_s']:>19}")
    for name in ("planned_failover", "unplanned_failover"):
        over = results[name]
        print(f"{name:22}{over['post_to_succeeded_s']:>19}{over['post_to_answering_s']:>19}"
              f"{over['ratio_answering_vs_restart']:>12}")
    print(f"unplanned: the point it started from was taken {results['unplanned_failover']['point_age_at_kill_s']} s "
          f"before site-a died")
    for back in results["failbacks"]:
        print(f"failback after {back['after']}: changed {mib(back['bytes_changed'])} MiB, sent "
              f"{mib(back['bytes_sent'])} MiB for {mib(back['guest_bytes_written'])} MiB the guest wrote at site-b "
              f"(sent/written {back['ratio_sent_vs_written']}, sent/disk {back['ratio_sent_vs_disk']}, sent/full ship "
              f"{back['ratio_sent_vs_full_ship']}); "
              f"POST -> answering {back['post_to_answering_s']} s")
    for name, goal in results["goals"].items():
        limit = next((f" ({key} {goal[key]})" for key in ("target", "bound") if key in goal), "")
        print(f"goal {name}: {goal['value']}{limit} -> {'met' if goal['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="continuous replication while the guest writes")
    parser.add_argument("--rate-mib-s", type=float, default=2.0, help="what the guest writes a second (0.1-10)")
    parser.add_argument("--write-kib", type=int, default=64, help="size of one write (4-256, a multiple of 4)")
    parser.add_argument("--file-mib", type=int, default=32, choices=range(4, 41), metavar="4-40",
                        help="the file written into (the root filesystem has 64 MiB)")
    parser.add_argument("--rpo-target-s", type=int, default=30)
    parser.add_argument("--bandwidth-limit", help="e.g. 20M (default: none)")
    parser.add_argument("--interval-s", type=float, help="replication.continuous_interval_s (default: the packaged)")
    parser.add_argument("--without-s", type=float, default=60, help="the writer alone, before replication")
    parser.add_argument("--site-b-s", type=float, default=30, help="the writer at site-b before each failback")
    args = parser.parse_args(argv)
    if not 0.5 <= args.minutes <= 30:  # GET /jobs answers at most 500 jobs: the period's ships must fit
        parser.error("--minutes is 0.5-30")
    if not 0.1 <= args.rate_mib_s <= 10:
        parser.error("--rate-mib-s is 0.1-10")
    if args.write_kib % 4 or not 4 <= args.write_kib <= 256:
        parser.error("--write-kib is a multiple of 4 from 4 to 256")
    require_root_and("bench/replicate.py", (), "it brings up a lab of namespaces and libvirtds")
    return measure_and_report("replicate", lambda scratch: measure(args, scratch), print_report)


if __name__ == "__main__":
    sys.exit(main())
