"""The reconciler: finds jobs whose worker died and runs them again or rolls them back, and has
every server correct the DB's VM states from libvirt.

A running job keeps `job:<id>:alive` fresh (tasks.runner.Heartbeat). When that key is gone, the
worker died mid-job: the job is dispatched again for its current attempt (its steps are
idempotent), or, after `max_attempts` or for kinds that must not re-run, dispatched to run its
cleanup only and end `failed` with WorkerLost. A job queued for long is sent again, in case
its message was lost. A parent waiting for its children is woken when they have ended or their
time is up, in case the wake-up of the last child was lost. A VM wanted deleted (a delete that
failed, an install whose undo failed) is deleted again until that succeeds.
"""

from datetime import timedelta

from celery.signals import worker_ready
from sqlalchemy import select

from errors import LaxError
from models import QUEUED, RUNNING, ClusterServer, Job, JobLock, VirtualMachine, utcnow
from models.db import transaction
from tasks import runtime, submission
from tasks.app import app
from tasks.continuations import wake
from tasks.dispatch import alive_key, dispatch
from tasks.queues import CONTROL, node_queue
from tasks.runtime import Runtime
from tasks.workflow import lookup


@app.task(name="laxcluster.reconcile")
def reconcile() -> dict[str, list[str]]:
    rt = runtime.current()
    ask_servers_for_vm_states(rt)
    return reconcile_jobs(rt)


def ask_servers_for_vm_states(rt: Runtime) -> None:
    """Have each server's node worker correct the DB's VM states (a VM may stop or crash by itself)."""
    with rt.sessions() as session:
        names = list(session.scalars(select(ClusterServer.name)))
    for name in names:
        app.send_task("laxcluster.sync_vm_states", args=[name], queue=node_queue(name),
                      expires=float(rt.config.section("jobs")["reconcile_every_s"]))


def reconcile_jobs(rt: Runtime) -> dict[str, list[str]]:
    """Re-dispatch or roll back every running job without a live worker; return what was done."""
    settings = rt.config.section("jobs")
    ttl = int(settings["heartbeat_ttl_s"])
    grace = utcnow() - timedelta(seconds=ttl)
    done: dict[str, list[str]] = {"rerun": [], "rollback": []}
    with transaction(rt.sessions) as session:
        orphans = [job for job in session.scalars(select(Job).where(Job.state == RUNNING, Job.waiting.is_(False),
                                                                    Job.updated_at < grace))
                   if not rt.redis.exists(alive_key(job.id))]
    done["redispatched"] = redispatch_stale_queued(rt, settings)
    done["woken"] = wake_waiting(rt)
    done["deleting"] = retry_deletions(rt, settings)
    for job in orphans:
        # Claim the re-dispatch for one heartbeat period, so the next tick does not send it again.
        if not rt.redis.set(alive_key(job.id), "requeued", ex=ttl * 2, nx=True):
            continue
        rerun = lookup(job.kind).rerun_after_crash and job.attempt < int(settings["max_attempts"])
        dispatch(app, job, rollback=not rerun)
        done["rerun" if rerun else "rollback"].append(job.id)
    return done


def retry_deletions(rt: Runtime, settings: dict) -> list[str]:
    """Start `delete-vm` again for VMs wanted deleted that no job holds; return their names."""
    with rt.sessions() as session:
        names = list(session.scalars(
            select(VirtualMachine.name).where(VirtualMachine.desired_state == "deleted",
                                              ~select(JobLock).where(JobLock.target == "vm/" + VirtualMachine.name).exists())))
    started = []
    for name in names:
        if not rt.redis.set(f"vm:{name}:delete-retry", 1, ex=int(settings["retry_delete_every_s"]), nx=True):
            continue
        try:
            submission.start(rt, app, "delete-vm", {"vm": name}, submission.Requester("reconciler"))
        except LaxError:
            continue  # taken meanwhile, or the broker is away: the next round tries again
        started.append(name)
    return started


def wake_waiting(rt: Runtime) -> list[str]:
    """Resume waiting parents whose children have ended (or run out of time) without waking them."""
    hold = int(rt.config.section("jobs")["requeue_after_s"])
    woken = []
    with transaction(rt.sessions) as session:
        for job in session.scalars(select(Job).where(Job.state == RUNNING, Job.waiting.is_(True))).all():
            # One wake per attempt for a while, so a busy queue does not fill with duplicates.
            if rt.redis.exists(f"job:{job.id}:woken:{job.attempt}") or not wake(session, app, job.id):
                continue
            rt.redis.set(f"job:{job.id}:woken:{job.attempt}", 1, ex=hold)
            woken.append(job.id)
    return woken


def redispatch_stale_queued(rt: Runtime, settings: dict) -> list[str]:
    """Send queued jobs again whose message may be lost (a broker restarted without its data).

    A duplicate message is harmless: only the one matching the job's attempt can claim it.
    """
    stale = utcnow() - timedelta(seconds=int(settings["requeue_after_s"]))
    with transaction(rt.sessions) as session:
        queued = list(session.scalars(select(Job).where(Job.state == QUEUED, Job.created_at < stale)))
    sent = []
    for job in queued:
        if rt.redis.set(f"job:{job.id}:redispatched", 1, ex=int(settings["requeue_after_s"]), nx=True):
            dispatch(app, job)
            sent.append(job.id)
    return sent


@worker_ready.connect
def reconcile_when_a_worker_starts(sender, **_: object) -> None:
    """A worker coming back is the moment its predecessor's jobs are likely orphaned."""
    app.send_task("laxcluster.reconcile", queue=CONTROL, expires=60)
