"""Which backups a policy covers and lets go, and which backup jobs still write to a store."""

from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import FINAL_STATES, Job, VirtualMachine
from models.protection import Backup, BackupPolicy
from workers.san.backup import retention_keep

RETENTION_KEYS = ("keep_last", "daily", "weekly", "monthly")


def selected_vms(session: Session, policy: BackupPolicy) -> list[str]:
    """The VMs a policy names, plus those carrying its tag, that still exist."""
    names = set(policy.selector.get("vms") or [])
    tag = policy.selector.get("tag")
    existing = session.execute(select(VirtualMachine.name, VirtualMachine.tags)).all()
    return sorted(name for name, tags in existing if name in names or (tag and tag in (tags or [])))


def unfinished_backup_jobs(session: Session, store: str, policy: str | None = None) -> list[Job]:
    """Backup jobs still queued or running that write to `store` (made by `policy`, if given)."""
    rows = session.scalars(select(Job).where(Job.kind == "snapshot-backup", Job.state.not_in(FINAL_STATES)))
    return [job for job in rows if job.params.get("store") == store
            and (policy is None or job.params.get("policy") == policy)]


def prunable(session: Session, policy: BackupPolicy) -> list[str]:
    """Ids of the policy's backups its retention lets go (per volume, parents of kept ones stay)."""
    retention = {key: int(policy.retention.get(key, 0)) for key in RETENTION_KEYS}
    if not any(retention.values()):
        return []
    vms = selected_vms(session, policy) + list(policy.selector.get("vms") or [])
    rows = session.scalars(select(Backup).where(Backup.store_id == policy.store_id, Backup.vm_name.in_(set(vms))))
    by_volume: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_volume[(row.san_name, row.volume_name)].append(
            {"id": row.id, "created_at": row.created_at, "parent": row.parent_id})
    gone = []
    for chain in by_volume.values():
        keep = retention_keep(chain, **retention)
        gone += [b["id"] for b in chain if b["id"] not in keep]
    return gone
