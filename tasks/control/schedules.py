"""The backup scheduler: one beat task reads BackupPolicy rows and enqueues what is due; pruning by retention.

A policy's schedule is a cron expression in UTC. Each tick, a policy whose latest due moment is
newer than its `last_run_at` claims that moment with a conditional UPDATE, so two ticks (or two
beat processes) can never both enqueue it; its jobs also carry an idempotency key naming the
moment. A policy never run before starts at the next due moment after it is first seen.

Retention applies per volume to the backups of the policy's VMs in the policy's store; a
`prune-backups` job removes what retention lets go (never a parent a kept differential needs),
then garbage-collects the store's unreferenced chunks, unless a backup is writing to it.
"""

import logging
from datetime import datetime

from celery import Celery
from croniter import croniter
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from errors import TargetBusy
from models import Job, VirtualMachine, Volume, utcnow
from models.db import transaction
from models.protection import BackupPolicy, BackupStore
from tasks import runtime, submission
from tasks.app import app
from tasks.inventory.retention import prunable, selected_vms, unfinished_backup_jobs
from tasks.runtime import Runtime

log = logging.getLogger(__name__)
DISPATCH_TASK = "laxcluster.dispatch_backups"


def latest_due(schedule: str, now: datetime) -> datetime:
    """The most recent moment at or before `now` that `schedule` names."""
    if croniter.match(schedule, now):
        return now.replace(second=0, microsecond=0)
    return croniter(schedule, now).get_prev(datetime)


def mode_for(policy: BackupPolicy, due: datetime) -> str:
    """Full when the policy's full schedule names this moment, else the policy's mode."""
    full_schedule = policy.modes.get("full_schedule")
    if full_schedule and croniter.match(full_schedule, due):
        return "full"
    return policy.modes.get("mode", "full")


def claim_due(session: Session, policy: BackupPolicy, now: datetime) -> datetime | None:
    """Claim the policy's latest due moment if no tick has yet; None if nothing is due.

    A policy never seen before is marked as run now, so it starts with its next due moment."""
    due = latest_due(policy.schedule, now)
    if policy.last_run_at is None:
        session.execute(update(BackupPolicy).where(BackupPolicy.id == policy.id, BackupPolicy.last_run_at.is_(None))
                        .values(last_run_at=now))
        return None
    claimed = session.execute(update(BackupPolicy).where(
        BackupPolicy.id == policy.id, or_(BackupPolicy.last_run_at.is_(None), BackupPolicy.last_run_at < due))
        .values(last_run_at=due)).rowcount
    return due if claimed else None


def has_disk(session: Session, vm: str) -> bool:
    return session.scalar(select(Volume.id).join(VirtualMachine, Volume.vm_id == VirtualMachine.id)
                          .where(VirtualMachine.name == vm, Volume.role == "disk").limit(1)) is not None


def enqueue_backups(session: Session, policy: BackupPolicy, due: datetime) -> list[Job]:
    """Submit one snapshot-backup job per selected VM for moment `due`; a VM busy with a backup is skipped."""
    store = session.get(BackupStore, policy.store_id).name
    submitted = []
    for vm in selected_vms(session, policy):
        if not has_disk(session, vm):
            continue
        params = {"vm": vm, "mode": mode_for(policy, due), "store": store, "policy": policy.name}
        try:
            with session.begin_nested():
                job, created = submission.submit(session, "snapshot-backup", params, _requester(policy),
                                                 idempotency_key=f"policy:{policy.id}:{due.isoformat()}:{vm}")
        except TargetBusy as busy:
            log.warning("policy %s: backup of %s skipped at %s: %s", policy.name, vm, due, busy.message)
            continue
        if created:
            submitted.append(job)
    return submitted


def _requester(policy: BackupPolicy) -> submission.Requester:
    return submission.Requester(f"policy/{policy.name}")


def enqueue_prune(session: Session, policy: BackupPolicy) -> Job | None:
    """A prune-backups job for the policy when its retention lets backups go and none of its backups is unfinished."""
    store = session.get(BackupStore, policy.store_id)
    if unfinished_backup_jobs(session, store.name, policy.name) or not prunable(session, policy):
        return None
    if not any(has_disk(session, vm) for vm in selected_vms(session, policy)):
        return None
    try:
        with session.begin_nested():
            job, _ = submission.submit(session, "prune-backups", {"policy": policy.name}, _requester(policy))
    except TargetBusy:
        return None
    return job


def dispatch_due(rt: Runtime, celery: Celery, now: datetime | None = None) -> dict[str, list[str]]:
    """One scheduler tick: enqueue every due backup and every prune retention asks for; return the job ids."""
    now = now or utcnow()
    made: dict[str, list[str]] = {"backups": [], "prunes": []}
    with transaction(rt.sessions) as session:
        policies = list(session.scalars(select(BackupPolicy).where(BackupPolicy.enabled.is_(True))
                                        .order_by(BackupPolicy.name)))
        new_jobs = []
        for policy in policies:
            due = claim_due(session, policy, now)
            if due is not None:
                new_jobs += enqueue_backups(session, policy, due)
            pruning = enqueue_prune(session, policy)
            if pruning is not None:
                new_jobs.append(pruning)
    for job in new_jobs:
        submission.launch(rt, celery, job)
        made["prunes" if job.kind == "prune-backups" else "backups"].append(job.id)
    return made


@app.task(name=DISPATCH_TASK)
def dispatch_backups() -> dict[str, list[str]]:
    """The beat task: one scheduler tick."""
    return dispatch_due(runtime.current(), app)
