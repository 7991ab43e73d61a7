"""The replication dispatcher: one beat task reads Replication rows and starts the ships that are due.

A continuous replication ships `continuous_interval_s` after its last attempt began; a scheduled one at each
moment its cron line names (UTC). A VM whose ship still runs is skipped (its lock is taken), so ships of one
VM never overlap and a slow link only makes the RPO grow, which its status shows as `alert`.
"""

import logging
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from errors import TargetBusy
from models import Job, VirtualMachine, utcnow
from models.db import transaction
from models.protection import Replication
from tasks import runtime, submission
from tasks.app import app
from tasks.control.schedules import latest_due
from tasks.runtime import Runtime

log = logging.getLogger(__name__)
DISPATCH_TASK = "laxcluster.dispatch_replication"
REQUESTER = submission.Requester("replication")


def is_due(rep: Replication, interval_s: float, now: datetime) -> bool:
    if rep.last_attempt_at is None:
        return True
    if rep.mode == "continuous":
        return now - rep.last_attempt_at >= timedelta(seconds=interval_s)
    return latest_due(rep.schedule, now) > rep.last_attempt_at


def submit_ship(session: Session, vm: str, now: datetime) -> Job | None:
    """A replicate-to-dr job for `vm`, unless one runs (its lock is taken)."""
    try:
        with session.begin_nested():
            job, created = submission.submit(session, "replicate-to-dr", {"vm": vm}, REQUESTER,
                                             idempotency_key=f"replicate:{vm}:{now.isoformat()}")
    except TargetBusy:
        return None
    return job if created else None


def dispatch_due(rt: Runtime, celery: Celery, now: datetime | None = None) -> list[str]:
    """One tick: start every due ship; return the new jobs' ids."""
    now = now or utcnow()
    interval = float(rt.config.section("replication").get("continuous_interval_s", 5.0))
    with transaction(rt.sessions) as session:
        due = [vm for rep, vm in session.execute(select(Replication, VirtualMachine.name).join(VirtualMachine)
                                                  .where(Replication.enabled.is_(True)))
               if is_due(rep, interval, now)]
        made = [job for job in (submit_ship(session, vm, now) for vm in due) if job is not None]
    for job in made:
        submission.launch(rt, celery, job)
    return [job.id for job in made]


@app.task(name=DISPATCH_TASK)
def dispatch_replication() -> list[str]:
    """The beat task: one replication tick."""
    return dispatch_due(runtime.current(), app)
