"""Latency and throughput of the job spine beside a raw Celery round trip (issue 2, "Benchmark").

Starts a stack of its own in a new temporary directory, the way `laxcluster run` starts it
(`cli.services`): a redis-server on a free port, a migrated SQLite DB (or, with `--db postgresql`, a throwaway PostgreSQL database), one Celery worker on
the `control` queue (`-c 2`) and the API served for real by `cli.services.api_service`, plus an
admin token. Then it measures, in one run:

1. job latency: `--n` sequential `POST /jobs/noop {"seconds": 0}`, each timed from sending the
   POST to receiving that job's `succeeded` event on Redis pub/sub (`job:<id>:events`);
2. the baseline, interleaved with 1 so both see the same machine load: `--n` raw Celery round
   trips `send_task("laxcluster.ping").get()` through the same broker and worker; and, interleaved too,
   `GET /jobs/<id>` of each job (an authenticated request with one select): a job costs at least
   such a request plus a Celery round trip, so (read + raw) / raw is the floor of the ratio;
3. throughput: `--concurrent` submissions from a pool of `--threads` clients, jobs accepted per
   second over the submission phase, then how many accepted jobs did not reach a final state
   (in the DB, the jobs' source of truth) within `--deadline` seconds, and which POSTs failed; and the
   CPU each part (API, worker, Redis, the clients) spent per accepted job while the POSTs ran.

Prints our figures beside the baseline, writes `bench/results/jobs.json`, and stops every process
it started (by process group) and deletes its directory, also on failure, Ctrl-C or SIGTERM.

Run: `.venv/bin/python bench/jobs.py [--n 200] [--concurrent 1000] [--threads 50] [--db sqlite|postgresql]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
import requests
from celery import Celery
from sqlalchemy import Engine, func, select

import config
from benchkit import BenchError, measure_and_report
from cli.services import Service, Supervisor, api_service, redis_service
from cli.tokens import create_token
from lab.postgres import PostgresMissing, throwaway_database
from lab.processes import free_port, wait_until
from models import FINAL_STATES, Job
from models.db import make_engine, make_session_factory, migrate, transaction
from tasks.app import make_celery
from tasks.queues import CONTROL

READY_TIMEOUT_S = 90
WARMUP = 5  # round trips of each kind before timing: connections, imports, first DB pages
ROUND_TRIP_TIMEOUT_S = 60
POST_TIMEOUT_S = 120
POLL_S = 0.5
GOAL_RATIO, GOAL_ACCEPTED_PER_S = 2.0, 300
LOG_TAIL_LINES = 25
PROBLEM_MARKS = ("ERROR", "Traceback", "database is locked", "CRITICAL")


@dataclass
class Stack:
    """A running LaxCluster of our own: where the API is, an admin token, and client handles."""

    api_url: str
    token: str
    engine: Engine
    celery: Celery
    redis: redis.Redis
    api_command: list[str]
    services: list[Service]


def stack_environment(workdir: Path, db_url: str) -> dict[str, str]:
    """LAXCLUSTER_* overrides that point every process at this run's Redis, DB, ports and var dir."""
    return dict(
        os.environ,
        LAXCLUSTER_CONFIG=str(config.DEFAULTS),
        LAXCLUSTER_VAR_DIR=str(workdir / "var"),
        LAXCLUSTER_DB_URL=db_url,
        LAXCLUSTER_REDIS_HOST="127.0.0.1",
        LAXCLUSTER_REDIS_PORT=str(free_port()),
        LAXCLUSTER_REDIS_DB="0",
        LAXCLUSTER_API_HOST="127.0.0.1",
        LAXCLUSTER_API_PORT=str(free_port()),
    )


def control_worker(cfg: config.Config) -> Service:
    name = f"bench-{secrets.token_hex(3)}@%h"
    argv = [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-Q", CONTROL, "-n", name, "-c", "2",
            "--loglevel", "INFO"]
    return Service("worker control", argv, cfg.var_dir.resolve() / "log" / "worker-control.log")


def wait_while_running(condition: Callable[[], bool], what: str, services: list[Service]) -> None:
    """Poll `condition` until true; fail early if one of `services` exits, late after READY_TIMEOUT_S."""
    def ready() -> bool:
        for service in services:
            if service.exited() is not None:
                raise BenchError(f"{service.name} exited with {service.exited()} while waiting for {what}")
        return condition()

    wait_until(ready, READY_TIMEOUT_S, what, interval=0.2)


def redis_answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def new_admin_token(engine: Engine) -> str:
    with transaction(make_session_factory(engine)) as session:
        return create_token(session, "admin", f"bench-{secrets.token_hex(3)}")


@contextmanager
def inventory_url(db: str, workdir: Path) -> Iterator[str]:
    """The DB to run on: a SQLite file in `workdir`, or a throwaway PostgreSQL database (dropped after)."""
    if db == "sqlite":
        yield f"sqlite:///{workdir / 'inventory.db'}"
        return
    try:
        with throwaway_database() as database:
            yield database.url
    except PostgresMissing as missing:
        raise BenchError(str(missing)) from None


@contextmanager
def running_stack(workdir: Path, db_url: str) -> Iterator[Stack]:
    """Redis, DB, control worker and API in `workdir`; all stopped (process groups) when the block ends."""
    env = stack_environment(workdir, db_url)
    cfg = config.load(environ=env)
    supervisor = Supervisor(env)
    client = redis.Redis.from_url(cfg.redis_url, decode_responses=True)
    engine = make_engine(cfg.db_url)
    celery = make_celery(cfg)
    try:
        supervisor.start(redis_service(cfg))
        wait_while_running(lambda: redis_answers(client), "redis to answer", supervisor.running)
        migrate(cfg.db_url)
        token = new_admin_token(engine)
        worker, api = control_worker(cfg), api_service(cfg)
        supervisor.start(worker)
        supervisor.start(api)
        api_url = f"http://{cfg.section('api')['host']}:{cfg.section('api')['port']}"
        wait_while_running(lambda: " ready." in worker.log.read_text(), "the control worker to be ready", supervisor.running)
        wait_while_running(lambda: http_ok(f"{api_url}/health"), "the API to answer", supervisor.running)
        yield Stack(api_url, token, engine, celery, client, api.argv, list(supervisor.running))
    except Exception:
        print_log_tails(supervisor.running)
        raise
    finally:
        supervisor.stop_all()
        celery.close()
        client.close()
        engine.dispose()


def print_log_tails(services: list[Service]) -> None:
    for service in services:
        if service.log.exists():
            tail = service.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            print(f"--- last lines of {service.log} ({service.name}):", *tail, sep="\n", file=sys.stderr)


class JobEvents:
    """Notes every job event seen on Redis pub/sub (subscribed before any job is sent): when each state
    was first published (the event's own `at`) and when the final event arrived here."""

    def __init__(self, client: redis.Redis) -> None:
        self._pubsub = client.pubsub()
        self._published: dict[str, dict[str, float]] = {}
        self._final: dict[str, tuple[str, float, float]] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="job-events", daemon=True)

    def __enter__(self) -> JobEvents:
        self._pubsub.psubscribe("job:*:events")
        # Redis confirms the subscription only once it is active: events after this are not missed.
        confirmed = self._pubsub.get_message(timeout=10)
        if confirmed is None or confirmed["type"] != "psubscribe":
            raise BenchError(f"no psubscribe confirmation from Redis (got {confirmed!r})")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._pubsub.close()

    def wait_final(self, job_id: str, timeout: float) -> tuple[str, float, float]:
        """(final state, perf_counter and wall time when its event arrived) of `job_id`; BenchError after `timeout`."""
        with self._changed:
            if not self._changed.wait_for(lambda: job_id in self._final, timeout):
                raise BenchError(f"job {job_id} sent no final event within {timeout}s")
            return self._final[job_id]

    def published(self, job_id: str) -> dict[str, float]:
        """Wall time each state of `job_id` was first published, by state."""
        with self._changed:
            return dict(self._published.get(job_id, {}))

    def count_final(self, job_ids: set[str]) -> int:
        with self._changed:
            return len(job_ids & self._final.keys())

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=POLL_S)
            if message is None or message["type"] != "pmessage":
                continue
            arrived, arrived_wall = time.perf_counter(), time.time()
            event = json.loads(message["data"])
            with self._changed:
                self._published.setdefault(event["job_id"], {}).setdefault(event["state"], event["at"])
                if event["state"] in FINAL_STATES:
                    self._final.setdefault(event["job_id"], (event["state"], arrived, arrived_wall))
                    self._changed.notify_all()


@dataclass(frozen=True)
class JobTrip:
    """One noop job's round trip in milliseconds: in total, until the POST's answer, and by segment."""

    job_id: str
    total_ms: float
    post_ms: float
    segments_ms: dict[str, float]


SEGMENTS = ("api: POST sent -> queued published", "queue: queued -> running published",
            "run: running -> succeeded published", "notify: succeeded published -> received")


def api_session(stack: Stack) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {stack.token}"
    return session


def time_job(stack: Stack, session: requests.Session, events: JobEvents) -> JobTrip:
    """Send `POST /jobs/noop` and time it until its answer and until that job's `succeeded` event arrives."""
    start, start_wall = time.perf_counter(), time.time()
    response = session.post(f"{stack.api_url}/jobs/noop", json={"seconds": 0}, timeout=POST_TIMEOUT_S)
    answered = time.perf_counter()
    if response.status_code != 202:
        raise BenchError(f"POST /jobs/noop answered {response.status_code}: {response.text[:500]}")
    job_id = response.json()["id"]
    state, arrived, arrived_wall = events.wait_final(job_id, ROUND_TRIP_TIMEOUT_S)
    if state != "succeeded":
        raise BenchError(f"noop job {job_id} ended {state}: {session.get(f'{stack.api_url}/jobs/{job_id}').text}")
    # Segments compare wall clocks of processes on this one machine; the totals use perf_counter.
    marks = events.published(job_id)
    points = [start_wall, marks["queued"], marks["running"], marks["succeeded"], arrived_wall]
    segments = {name: (end - begin) * 1000 for name, begin, end in zip(SEGMENTS, points, points[1:])}
    return JobTrip(job_id, (arrived - start) * 1000, (answered - start) * 1000, segments)


def time_ping(stack: Stack, value: int) -> float:
    """Milliseconds of one raw Celery round trip: `laxcluster.ping` on the control queue and its result."""
    start = time.perf_counter()
    result = stack.celery.send_task("laxcluster.ping", args=[value], queue=CONTROL)
    answer = result.get(timeout=ROUND_TRIP_TIMEOUT_S)
    elapsed = (time.perf_counter() - start) * 1000
    if answer != value:
        raise BenchError(f"laxcluster.ping({value}) returned {answer!r}")
    result.forget()
    return elapsed


def time_read(stack: Stack, session: requests.Session, job_id: str) -> float:
    """Milliseconds of `GET /jobs/<id>`: an authenticated HTTP round trip with one primary-key select, the
    least any job submission costs before it writes anything."""
    start = time.perf_counter()
    response = session.get(f"{stack.api_url}/jobs/{job_id}", timeout=POST_TIMEOUT_S)
    elapsed = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        raise BenchError(f"GET /jobs/{job_id} answered {response.status_code}: {response.text[:500]}")
    return elapsed


def measure_latency(stack: Stack, events: JobEvents, n: int) -> tuple[list[JobTrip], list[float], list[float]]:
    """`n` jobs, `n` raw round trips and `n` reads of each job, interleaved (job, ping, read, job, ...) after a
    warm-up of each."""
    trips: list[JobTrip] = []
    pings_ms: list[float] = []
    reads_ms: list[float] = []
    with api_session(stack) as session:
        for i in range(WARMUP + n):
            trip = time_job(stack, session, events)
            ping_ms = time_ping(stack, i)
            read_ms = time_read(stack, session, trip.job_id)
            if i >= WARMUP:
                trips.append(trip)
                reads_ms.append(read_ms)
                pings_ms.append(ping_ms)
    return trips, pings_ms, reads_ms


@dataclass
class Submissions:
    """What `count` concurrent POSTs got: the accepted job ids and every failure by status or error."""

    accepted: list[str] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    failure_samples: dict[str, str] = field(default_factory=dict)
    accepted_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def submit_concurrently(stack: Stack, count: int, threads: int) -> Submissions:
    """`count` POST /jobs/noop from `threads` threads, each with its own requests.Session."""
    local = threading.local()
    sessions: list[requests.Session] = []
    lock = threading.Lock()

    def post(_: int) -> tuple[str, str, float]:
        if not hasattr(local, "session"):
            local.session = api_session(stack)
            with lock:
                sessions.append(local.session)
        start = time.perf_counter()
        try:
            response = local.session.post(f"{stack.api_url}/jobs/noop", json={"seconds": 0}, timeout=POST_TIMEOUT_S)
        except requests.RequestException as error:
            return type(error).__name__, str(error)[:500], 0.0
        elapsed_ms = (time.perf_counter() - start) * 1000
        if response.status_code == 202:
            return "202", response.json()["id"], elapsed_ms
        return str(response.status_code), response.text[:500], elapsed_ms

    outcome = Submissions()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="submit")
    start = time.perf_counter()
    try:
        results = list(pool.map(post, range(count)))
        outcome.wall_s = time.perf_counter() - start
    finally:
        # On Ctrl-C or SIGTERM, drop the submissions not yet sent instead of waiting for them.
        pool.shutdown(wait=False, cancel_futures=True)
        for session in sessions:
            session.close()
    for status, detail, elapsed_ms in results:
        if status == "202":
            outcome.accepted.append(detail)
            outcome.accepted_ms.append(elapsed_ms)
        else:
            outcome.failures[status] += 1
            outcome.failure_samples.setdefault(status, detail)
    return outcome


def states_of(engine: Engine, job_ids: list[str]) -> Counter[str]:
    """How many of `job_ids` the DB holds in each state ("missing" for ids without a row)."""
    with make_session_factory(engine)() as session:
        rows = dict(session.execute(select(Job.state, func.count()).where(Job.id.in_(job_ids)).group_by(Job.state)).all())
    states = Counter(rows)
    states["missing"] = len(job_ids) - sum(rows.values())
    return +states


def not_final(states: Counter[str]) -> int:
    return sum(count for state, count in states.items() if state not in FINAL_STATES)


def wait_all_final(engine: Engine, job_ids: list[str], deadline_s: float) -> tuple[Counter[str], float]:
    """Poll the DB until every job is final or `deadline_s` passed; (states at the end, seconds waited)."""
    start = time.perf_counter()
    while True:
        states = states_of(engine, job_ids)
        waited = time.perf_counter() - start
        if not_final(states) == 0 or waited > deadline_s:
            return states, waited
        time.sleep(POLL_S)


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) spent by the live processes of process group `pgid` and their reaped children."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            # After the command name in parentheses: state, ppid, pgrp, ... utime, stime, cutime, cstime (11-14).
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid:
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_by_part(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of each service of the stack and of this process (the clients)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {**{service.name: group_cpu_s(service.proc.pid) for service in stack.services},
            "clients (this process)": usage.ru_utime + usage.ru_stime}


def submission_cpu(before: dict[str, float], after: dict[str, float], accepted: int) -> dict[str, Any]:
    """Core-milliseconds per accepted job of each part during the submissions, and the acceptance rates these
    costs allow on this machine's cores: with every part on them (as here), and for the API alone."""
    per_job = {part: round((after[part] - before[part]) * 1000 / max(accepted, 1), 2) for part in before}
    return {"submission_core_ms_per_job": per_job,
            "all_parts_bound_per_s": _rate_on_all_cores(sum(per_job.values())),
            "api_alone_bound_per_s": _rate_on_all_cores(per_job.get("api", 0.0))}


def _rate_on_all_cores(core_ms_per_job: float) -> float | None:
    return round((os.cpu_count() or 1) * 1000 / core_ms_per_job, 1) if core_ms_per_job else None


def measure_throughput(stack: Stack, events: JobEvents, count: int, threads: int, deadline_s: float) -> dict[str, Any]:
    cpu_before = cpu_by_part(stack)
    submissions = submit_concurrently(stack, count, threads)
    cpu_after = cpu_by_part(stack)
    states, drained_s = wait_all_final(stack.engine, submissions.accepted, deadline_s)
    accepted = len(submissions.accepted)
    total_s = submissions.wall_s + drained_s
    return {
        "submitted": count,
        "threads": threads,
        "accepted": accepted,
        "submission_wall_s": round(submissions.wall_s, 3),
        "accepted_per_s": round(accepted / submissions.wall_s, 1),
        **submission_cpu(cpu_before, cpu_after, accepted),
        **({"post_p50_ms_under_load": round(statistics.median(submissions.accepted_ms), 1),
            "post_p99_ms_under_load": round(percentile(submissions.accepted_ms, 99), 1),
            "post_max_ms_under_load": round(max(submissions.accepted_ms), 1)} if accepted > 1 else {}),
        "all_final_after_s": round(total_s, 3),
        "completed_per_s": round(accepted / total_s, 1) if accepted else 0.0,
        "final_states": dict(states),
        "not_final": not_final(states),
        "final_events_received": events.count_final(set(submissions.accepted)),
        "failed_posts": sum(submissions.failures.values()),
        "failed_post_codes": dict(submissions.failures),
        "failed_post_samples": submissions.failure_samples,
        "control_queue_left": stack.redis.llen(CONTROL),
    }


def percentile(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def latency_figures(trips: list[JobTrip], pings_ms: list[float], reads_ms: list[float]) -> dict[str, Any]:
    jobs_ms, posts_ms = [trip.total_ms for trip in trips], [trip.post_ms for trip in trips]
    job_p50, raw_p50, read_p50 = statistics.median(jobs_ms), statistics.median(pings_ms), statistics.median(reads_ms)
    return {
        "n": len(jobs_ms),
        "job_post_p50_ms": round(statistics.median(posts_ms), 2),
        "job_post_p99_ms": round(percentile(posts_ms, 99), 2),
        "job_segments_p50_ms": {name: round(statistics.median(trip.segments_ms[name] for trip in trips), 2)
                                for name in SEGMENTS},
        "job_p50_ms": round(job_p50, 2),
        "job_p99_ms": round(percentile(jobs_ms, 99), 2),
        "job_max_ms": round(max(jobs_ms), 2),
        "raw_p50_ms": round(raw_p50, 2),
        "raw_p99_ms": round(percentile(pings_ms, 99), 2),
        "raw_max_ms": round(max(pings_ms), 2),
        "ratio_p50": round(job_p50 / raw_p50, 2),
        "read_p50_ms": round(read_p50, 2),
        # A job is at least an authenticated request and a Celery round trip, with no DB write and no event.
        "floor_ratio_p50": round((read_p50 + raw_p50) / raw_p50, 2),
    }


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with inventory_url(args.db, workdir) as db_url, running_stack(workdir, db_url) as stack, \
            JobEvents(stack.redis) as events:
        print(f"stack up: API {stack.api_url} ({Path(stack.api_command[0]).name} {' '.join(stack.api_command[1:7])}), "
              f"control worker -c 2, {args.db}, Redis on port {stack.redis.connection_pool.connection_kwargs['port']}")
        load_before = os.getloadavg()
        print(f"latency: {args.n} noop jobs, reads of them and raw pings, interleaved ...")
        latency = latency_figures(*measure_latency(stack, events, args.n))
        print(f"throughput: {args.concurrent} concurrent submissions from {args.threads} threads ...")
        throughput = measure_throughput(stack, events, args.concurrent, args.threads, args.deadline)
        return {
            **latency,
            **throughput,
            "log_problems": log_problems(stack.services),
            "goals": goals(latency, throughput),
            "db": args.db,
            "api_command": [Path(stack.api_command[0]).name, *stack.api_command[1:]],
            "worker": f"celery worker -Q {CONTROL} -c 2",
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def goals(latency: dict[str, Any], throughput: dict[str, Any]) -> dict[str, Any]:
    """Issue 17's goals (job p50 at most twice a raw Celery round trip, 300 jobs accepted a second) and the
    spine's own (every accepted job final, no POST refused), each with its value and whether it was met."""
    return {
        f"ratio_p50 <= {GOAL_RATIO}": {"value": latency["ratio_p50"], "met": latency["ratio_p50"] <= GOAL_RATIO},
        f"accepted_per_s >= {GOAL_ACCEPTED_PER_S}": {"value": throughput["accepted_per_s"],
                                                      "met": throughput["accepted_per_s"] >= GOAL_ACCEPTED_PER_S},
        "not_final == 0": {"value": throughput["not_final"], "met": throughput["not_final"] == 0},
        "failed_posts == 0": {"value": throughput["failed_posts"], "met": throughput["failed_posts"] == 0},
    }


def log_problems(services: list[Service]) -> dict[str, Any]:
    """Per service, how many log lines report an error, a traceback or a locked DB, and the first of them."""
    problems: dict[str, Any] = {}
    for service in services:
        lines = [line for line in service.log.read_text(errors="replace").splitlines()
                 if any(mark in line for mark in PROBLEM_MARKS)]
        if lines:
            problems[service.name] = {"lines": len(lines), "first": lines[0][:500]}
    return problems


def print_report(results: dict[str, Any]) -> None:
    print(f"\n{'':32}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    print(f"{'job: POST -> succeeded event':32}{results['job_p50_ms']:>10.2f}{results['job_p99_ms']:>10.2f}{results['job_max_ms']:>10.2f}")
    print(f"{'  of which POST -> 202 answer':32}{results['job_post_p50_ms']:>10.2f}{results['job_post_p99_ms']:>10.2f}")
    for name, p50 in results["job_segments_p50_ms"].items():
        print(f"{'    ' + name.split(':')[0]:32}{p50:>10.2f}   ({name.split(': ')[1]})")
    print(f"{'baseline: raw Celery ping':32}{results['raw_p50_ms']:>10.2f}{results['raw_p99_ms']:>10.2f}{results['raw_max_ms']:>10.2f}")
    print(f"{'read: GET /jobs/<id>':32}{results['read_p50_ms']:>10.2f}")
    print(f"ratio job p50 / raw p50: {results['ratio_p50']:.2f}  (n = {results['n']} each); "
          f"floor (read + raw) / raw: {results['floor_ratio_p50']:.2f}")
    print(f"\nsubmissions: {results['accepted']} of {results['submitted']} accepted in {results['submission_wall_s']:.2f} s "
          f"from {results['threads']} threads = {results['accepted_per_s']:.1f} jobs/s")
    print("CPU per accepted job meanwhile (core-ms): " + ", ".join(
        f"{part} {ms:.2f}" for part, ms in results["submission_core_ms_per_job"].items())
          + f"; on {results['cpus']} cores that allows at most {results['all_parts_bound_per_s']} jobs/s, "
            f"{results['api_alone_bound_per_s']} for the API alone")
    if "post_p50_ms_under_load" in results:
        print(f"POST -> 202 under load: p50 {results['post_p50_ms_under_load']:.1f} ms, "
              f"p99 {results['post_p99_ms_under_load']:.1f} ms, max {results['post_max_ms_under_load']:.1f} ms")
    print(f"all final after {results['all_final_after_s']:.2f} s = {results['completed_per_s']:.1f} jobs/s completed; "
          f"states {results['final_states']}")
    print(f"not final: {results['not_final']} (goal 0); failed POSTs: {results['failed_posts']} {results['failed_post_codes'] or ''}")
    for status, sample in results["failed_post_samples"].items():
        print(f"  first {status}: {sample}")
    for name, problem in results["log_problems"].items():
        print(f"log of {name}: {problem['lines']} problem lines, first: {problem['first']}")
    for name, goal in results["goals"].items():
        print(f"goal {name}: {goal['value']}, {'met' if goal['met'] else 'not met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="timed round trips of each kind (default 200)")
    parser.add_argument("--concurrent", type=int, default=1000, help="concurrent submissions (default 1000)")
    parser.add_argument("--threads", type=int, default=50, help="client threads submitting them (default 50)")
    parser.add_argument("--deadline", type=float, default=300, help="seconds to wait for every accepted job to be final")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the inventory: a SQLite file (default) or a throwaway database on the local PostgreSQL 15 "
                             "(needs root)")
    args = parser.parse_args(argv)
    if args.n < 2 or args.concurrent < 1 or args.threads < 1:
        parser.error("--n must be at least 2, --concurrent and --threads at least 1")
    return measure_and_report("jobs", lambda scratch: measure(args, scratch), print_report)


if __name__ == "__main__":
    sys.exit(main())
