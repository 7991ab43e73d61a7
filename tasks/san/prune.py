"""`prune-backups`, on the `san.<site>` queue: delete what a policy's retention lets go, then collect garbage."""
from typing import Any

from sqlalchemy import select

from models.protection import Backup, BackupPolicy, BackupStore
from tasks.context import JobContext
from tasks.inventory.retention import prunable, unfinished_backup_jobs
from tasks.san.backups import StoreRef, open_store
from tasks.san.volumes import san_place
from tasks.workflow import workflow
from workers.san.backup import collect_garbage


@workflow("prune-backups")
def prune_backups(ctx: JobContext) -> dict[str, Any]:
    """Delete the backups the policy's retention lets go (manifest, row, snapshot), newest first,
    then delete the store's chunks no manifest references, unless a backup is writing to the store."""
    with ctx.session() as session:
        policy = session.scalar(select(BackupPolicy).where(BackupPolicy.name == ctx.params.policy))
        gone = prunable(session, policy)
        row = session.get(BackupStore, policy.store_id)
        store = StoreRef(row.id, row.name, row.kind, row.location, dict(row.credentials or {}))
        doomed = list(session.scalars(select(Backup).where(Backup.id.in_(gone)).order_by(Backup.created_at.desc())))
    ctx.phase("delete backups", progress=10)
    with open_store(store) as chunk_store:
        for backup in doomed:
            chunk_store.delete_manifest(backup.id)
            with ctx.session() as session:
                session.delete(session.get(Backup, backup.id))
            if backup.snapshot:
                san_place(ctx.rt.config, backup.san_name).backend.delete_snapshot(backup.snapshot)
        ctx.phase("collect garbage", progress=50)
        with ctx.session() as session:
            busy = bool(unfinished_backup_jobs(session, store.name))
        collected = None
        if not busy:
            kept = [chunk_store.get_manifest(i) for i in chunk_store.list_manifests()]
            collected = collect_garbage(chunk_store, kept, on_progress=lambda done, total: ctx.report.update(
                progress=50 + 45 * done / total, bytes_done=done, bytes_total=total))
    return {"policy": ctx.params.policy, "deleted": [b.id for b in doomed], "garbage": collected,
            "garbage_skipped": "a backup is writing to the store" if busy else None}
