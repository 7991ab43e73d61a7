"""`GET /metrics`: Prometheus's text format, read at scrape time from where the truth is.

Jobs run in Celery workers and the API in several gunicorn processes, so no process holds the counts:
job, server, SAN and backup figures are queries on the inventory DB, and the API's request latency is
kept in Redis (one hash, a count per route, method, status and bucket) by every API process.
"""

import time
from collections import defaultdict
from collections.abc import Iterator

import redis
from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from api import context
from api.openapi import operation
from config import Config
from models import FINAL_STATES, QUEUED, RUNNING, ClusterServer, Job, JobLock, San, VirtualMachine, utcnow
from models.protection import Backup, Replication
from tasks.inventory import dr
from tasks.inventory.placement import capacity
from tasks.runtime import Runtime
from tasks.san.backups import USABLE

blueprint = Blueprint("metrics", __name__)
LATENCY_KEY = "metrics:api:latency"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
JOB_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, float("inf"))


@blueprint.get("/metrics")
@operation("LaxCluster's metrics in Prometheus's text format (docs/monitoring.md)", media_type="text/plain",
           response={"type": "string"})
def metrics():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(InventoryCollector(context.runtime()))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def record_latency(app: Flask) -> None:
    """Time every request of `app` into Redis (a lost count never fails the request)."""
    app.before_request(lambda: setattr(g, "metrics_started", time.perf_counter()))
    app.after_request(_count_request)


def _count_request(response: Response) -> Response:
    started = g.get("metrics_started")
    if started is not None:
        seconds = time.perf_counter() - started
        bucket = next(le for le in LATENCY_BUCKETS if seconds <= le)
        series = f"{request.url_rule.rule if request.url_rule else 'unmatched'}|{request.method}|{response.status_code}"
        client = context.runtime().redis
        # Written once the answer is sent, so the client does not wait for the round trip.
        response.call_on_close(lambda: _add_timing(client, series, bucket, seconds))
    return response


def _add_timing(client: redis.Redis, series: str, bucket: float, seconds: float) -> None:
    try:
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(LATENCY_KEY, f"{series}|{bucket}", 1).hincrbyfloat(LATENCY_KEY, f"{series}|sum", seconds)
        pipe.execute()
    except redis.RedisError:
        pass


class InventoryCollector:
    """Every family, collected afresh from the DB and Redis at each scrape."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def collect(self) -> Iterator[Metric]:
        with self.rt.sessions() as session:
            yield from job_metrics(session)
            yield from server_metrics(session, self.rt.config)
            yield san_free(session)
            yield from backup_metrics(session)
            yield from replication_metrics(session)
        yield api_latency(self.rt.redis)


def job_metrics(session: Session) -> Iterator[Metric]:
    ended = CounterMetricFamily("laxcluster_jobs", "Jobs that ended, by kind and final state", labels=["kind", "state"])
    for kind, state, count in session.execute(select(Job.kind, Job.state, func.count()).where(
            Job.state.in_(FINAL_STATES)).group_by(Job.kind, Job.state)):
        ended.add_metric([kind, state], count)
    yield ended
    active = GaugeMetricFamily("laxcluster_jobs_active", "Jobs queued or running now, by queue", labels=["queue", "state"])
    for queue, state, count in session.execute(select(Job.queue, Job.state, func.count()).where(
            Job.state.in_((QUEUED, RUNNING))).group_by(Job.queue, Job.state)):
        active.add_metric([queue, state], count)
    yield active
    yield oldest_queued(session)
    yield lock_waits(session)
    yield job_durations(session)


def oldest_queued(session: Session) -> Metric:
    family = GaugeMetricFamily("laxcluster_job_oldest_queued_seconds",
                               "Age of the oldest job still queued, by queue (a queue nobody consumes grows it)",
                               labels=["queue"])
    now = utcnow()
    for queue, oldest in session.execute(select(Job.queue, func.min(Job.created_at)).where(
            Job.state == QUEUED).group_by(Job.queue)):
        family.add_metric([queue], (now - oldest).total_seconds())
    return family


def lock_waits(session: Session) -> Metric:
    holder = aliased(Job)
    family = GaugeMetricFamily("laxcluster_jobs_waiting_for_lock",
                               "Queued jobs whose target another job holds, by kind", labels=["kind"])
    held = (select(Job.kind, func.count()).join(JobLock, JobLock.target == Job.target)
            .join(holder, holder.id == JobLock.job_id).where(Job.state == QUEUED, holder.id != Job.id)
            .group_by(Job.kind))
    for kind, count in session.execute(held):
        family.add_metric([kind], count)
    return family


def job_durations(session: Session) -> Metric:
    seconds: dict[str, list[float]] = defaultdict(list)
    for kind, started, finished in session.execute(select(Job.kind, Job.started_at, Job.finished_at).where(
            Job.started_at.is_not(None), Job.finished_at.is_not(None))):
        seconds[kind].append(max(0.0, (finished - started).total_seconds()))
    family = HistogramMetricFamily("laxcluster_job_duration_seconds", "From start to end of ended jobs, by kind",
                                   labels=["kind"])
    for kind, values in sorted(seconds.items()):
        family.add_metric([kind], cumulative(values, JOB_BUCKETS), sum(values))
    return family


def cumulative(values: list[float], buckets: tuple[float, ...]) -> list[tuple[str, int]]:
    return [(_le(le), sum(1 for value in values if value <= le)) for le in buckets]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def server_metrics(session: Session, config: Config) -> Iterator[Metric]:
    free = GaugeMetricFamily("laxcluster_server_memory_free_bytes", "Free memory at the last refresh", labels=["server"])
    room = GaugeMetricFamily("laxcluster_server_memory_allocatable_bytes",
                             "Memory placement can still give to VMs", labels=["server"])
    vms = GaugeMetricFamily("laxcluster_server_vms", "VMs placed on the server", labels=["server"])
    fenced = GaugeMetricFamily("laxcluster_server_fenced", "1 while the server is fenced at the SAN", labels=["server"])
    maintenance = GaugeMetricFamily("laxcluster_server_maintenance", "1 while the server takes no placements",
                                    labels=["server"])
    placed = dict(session.execute(select(VirtualMachine.server_id, func.count()).group_by(VirtualMachine.server_id)).all())
    for server in session.scalars(select(ClusterServer).order_by(ClusterServer.name)):
        if server.memory_free_bytes is not None:
            free.add_metric([server.name], server.memory_free_bytes)
        room.add_metric([server.name], capacity(session, config, server).memory_bytes)
        vms.add_metric([server.name], placed.get(server.id, 0))
        fenced.add_metric([server.name], int(server.fenced_at is not None))
        maintenance.add_metric([server.name], int(server.maintenance))
    yield from (free, room, vms, fenced, maintenance)


def san_free(session: Session) -> Metric:
    family = GaugeMetricFamily("laxcluster_san_pool_free_bytes", "Free bytes of the SAN's pool at its last refresh",
                               labels=["san"])
    for san in session.scalars(select(San).order_by(San.name)):
        if (san.facts or {}).get("free_bytes") is not None:
            family.add_metric([san.name], san.facts["free_bytes"])
    return family


def backup_metrics(session: Session) -> Iterator[Metric]:
    age = GaugeMetricFamily("laxcluster_backup_age_seconds", "Age of the VM's newest usable backup", labels=["vm"])
    last = GaugeMetricFamily("laxcluster_backup_last_ok",
                             "1 if the VM's newest backup is usable, 0 if it failed or is corrupt", labels=["vm"])
    now, newest_usable, newest = utcnow(), {}, {}
    for vm, state, created in session.execute(select(Backup.vm_name, Backup.state, Backup.created_at).where(
            Backup.state != "writing").order_by(Backup.created_at)):
        newest[vm] = state
        if state in USABLE:
            newest_usable[vm] = created
    for vm, state in sorted(newest.items()):
        last.add_metric([vm], int(state in USABLE))
    for vm, created in sorted(newest_usable.items()):
        age.add_metric([vm], (now - created).total_seconds())
    yield from (age, last)


def replication_metrics(session: Session) -> Iterator[Metric]:
    """Per replicated VM: the age of its newest consistent replica (RPO), its target, alert, bytes behind."""
    rpo = GaugeMetricFamily("laxcluster_replication_rpo_seconds", "Age of the VM's newest replica at the DR site",
                            labels=["vm"])
    target = GaugeMetricFamily("laxcluster_replication_rpo_target_seconds", "The VM's RPO target", labels=["vm"])
    alert = GaugeMetricFamily("laxcluster_replication_alert", "1 while the VM's RPO is above its target", labels=["vm"])
    behind = GaugeMetricFamily("laxcluster_replication_bytes_behind", "Bytes the ship under way has to send",
                               labels=["vm"])
    for rep, vm in session.execute(select(Replication, VirtualMachine).join(VirtualMachine).order_by(VirtualMachine.name)):
        state = dr.status(session, vm, rep)
        if state["rpo_s"] is not None:
            rpo.add_metric([vm.name], state["rpo_s"])
        target.add_metric([vm.name], rep.rpo_target_s)
        alert.add_metric([vm.name], int(state["state"] == "alert"))
        behind.add_metric([vm.name], rep.bytes_behind)
    yield from (rpo, target, alert, behind)


def api_latency(client: redis.Redis) -> Metric:
    family = HistogramMetricFamily("laxcluster_api_request_duration_seconds",
                                   "API requests by route, method and status, from every API process",
                                   labels=["route", "method", "status"])
    try:
        raw = client.hgetall(LATENCY_KEY)
    except redis.RedisError:
        return family
    counts: dict[tuple[str, ...], dict[str, float]] = defaultdict(dict)
    for field, value in raw.items():
        *series, slot = field.rsplit("|", 3)
        counts[tuple(series)][slot] = float(value)
    for series, slots in sorted(counts.items()):
        buckets, total = [], 0
        for le in LATENCY_BUCKETS:
            total += int(slots.get(str(le), 0))
            buckets.append((_le(le), total))
        family.add_metric(list(series), buckets, slots.get("sum", 0.0))
    return family
