"""How inventory rows look in JSON: numbers stay numbers, units are in the field names, times are UTC ISO 8601."""

from datetime import datetime
from typing import Any

from models import Cluster, ClusterServer, Job, San, Site
from tasks.dispatch import celery_task_id


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds") + "Z" if moment else None


def job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "target": job.target,
        "params": job.params,
        "queue": job.queue,
        "state": job.state,
        "progress": round(job.progress, 2),
        "phase": job.phase,
        "bytes_done": job.bytes_done,
        "bytes_total": job.bytes_total,
        "rate_bps": job.rate_bps,
        "result": job.result,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "requested_by": job.requested_by,
        "parent_id": job.parent_id,
        "cancel_requested": job.cancel_requested,
        "attempt": job.attempt,
        "celery_task_id": celery_task_id(job),
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "updated_at": iso(job.updated_at),
    }


def server_json(server: ClusterServer) -> dict[str, Any]:
    return {
        "name": server.name,
        "cluster": server.cluster.name,
        "site": server.cluster.site.name,
        "libvirt_uri": server.libvirt_uri,
        "initiator_iqn": server.initiator_iqn,
        "memory_limit_bytes": server.memory_limit_bytes,
        "maintenance": server.maintenance,
        "fenced_at": iso(server.fenced_at),
        "reachable": server.reachable,
        "cpu_count": server.cpu_count,
        "cpu_model": server.cpu_model,
        "cpu_mhz": server.cpu_mhz,
        "memory_total_bytes": server.memory_total_bytes,
        "memory_free_bytes": server.memory_free_bytes,
        "hypervisor_type": server.hypervisor_type,
        "hypervisor_version": server.hypervisor_version,
        "hypervisor": server.hypervisor,
        "hypervisor_evidence": server.hypervisor_evidence,
        "hostname": server.hostname,
        "facts_updated_at": iso(server.facts_updated_at),
    }


def site_json(site: Site) -> dict[str, Any]:
    return {"name": site.name, "clusters": sorted(c.name for c in site.clusters), "sans": sorted(s.name for s in site.sans)}


def cluster_json(cluster: Cluster) -> dict[str, Any]:
    return {"name": cluster.name, "site": cluster.site.name, "servers": sorted(s.name for s in cluster.servers)}


def san_json(san: San) -> dict[str, Any]:
    return {"name": san.name, "site": san.site.name, "backend": san.backend, "portal": san.portal,
            "pool_path": san.pool_path, "facts": san.facts}
