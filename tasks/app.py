"""The Celery app: broker, reliability settings, queues and the beat schedule.

Workers start with `celery -A tasks.app worker -Q <queue>`; the launcher does that per queue.
"""

import logging.config

from celery import Celery
from celery.signals import setup_logging

from config import Config
from config.logs import dict_config
from tasks import runtime
from tasks.queues import CONTROL

WORKFLOW_MODULES = ["tasks.runner", "tasks.reconcile",
                    "tasks.control.diagnostics", "tasks.control.servers", "tasks.control.vms", "tasks.control.migrate",
                    "tasks.control.evacuate", "tasks.control.rescue", "tasks.control.schedules",
                    "tasks.control.replication_schedule", "tasks.control.check", "tasks.control.ha",
                    "tasks.san.volumes", "tasks.san.backups", "tasks.san.prune", "tasks.san.inspect", "tasks.san.fencing",
                    "tasks.node.domains", "tasks.node.migrate", "tasks.node.servers", "tasks.node.inspect",
                    "tasks.node.heartbeat"]


def make_celery(config: Config) -> Celery:
    jobs = config.section("jobs")
    backup_tick = float(config.section("backups").get("dispatch_every_s", 20.0))
    ha_tick = float(config.section("ha").get("check_every_s", 5.0))
    replication_tick = float(config.section("replication").get("dispatch_every_s", 2.0))
    app = Celery("laxcluster", broker=config.redis_url, backend=config.redis_url, include=WORKFLOW_MODULES)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=CONTROL,
        task_create_missing_queues=True,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        # Above the longest job, so Redis does not hand a running job to a second worker;
        # a crashed worker's job is found by the reconciler instead (heartbeat keys).
        broker_transport_options={"visibility_timeout": jobs["visibility_timeout_s"]},
        result_backend_transport_options={"visibility_timeout": jobs["visibility_timeout_s"]},
        worker_send_task_events=True,
        # Flower lists a job's message from the moment a worker receives it. A "task-sent" event per send
        # would show it while queued, at a Redis publish on every submission (a third of send_task's time);
        # a queued job shows in the job list anyway.
        task_send_sent_event=False,
        beat_schedule={
            "reconcile-jobs": {
                "task": "laxcluster.reconcile",
                "schedule": float(jobs["reconcile_every_s"]),
                "options": {"queue": CONTROL, "expires": float(jobs["reconcile_every_s"])},
            },
            "watch-servers": {
                "task": "laxcluster.watch_servers",
                "schedule": ha_tick,
                "options": {"queue": CONTROL, "expires": ha_tick},
            },
            # Backup schedules live in BackupPolicy rows; this one tick enqueues what is due.
            "dispatch-backups": {
                "task": "laxcluster.dispatch_backups",
                "schedule": backup_tick,
                "options": {"queue": CONTROL, "expires": backup_tick},
            },
            # Likewise for DR replication: Replication rows say what ships when.
            "dispatch-replication": {
                "task": "laxcluster.dispatch_replication",
                "schedule": replication_tick,
                "options": {"queue": CONTROL, "expires": replication_tick},
            },
        },
    )
    return app


app = make_celery(runtime.current().config)


@setup_logging.connect
def log_as_configured(loglevel: int | str | None = None, logfile: str | None = None, **_: object) -> None:
    """Workers and beat log in the `[logging]` format instead of Celery's own (`--loglevel` and `--logfile`
    still choose the level and the file)."""
    logging.config.dictConfig(dict_config(runtime.current().config.section("logging"), loglevel, logfile or None))
