"""The first jobs of an embedded LaxCluster: server and SAN facts, and the lab's `tiny` template; and
registering a template built on this host (`laxcluster template build`) on every SAN."""

import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

import config
from errors import TargetBusy
from lab import cluster as lab_cluster, topology
from lab.template import build_tiny
from models import BackupStore, Job, San, Template
from models.db import transaction
from tasks import submission
from tasks.app import make_celery
from tasks.runtime import make_runtime

BOOTSTRAP_TIMEOUT_S = 300
LAUNCHER = submission.Requester("laxcluster run")


def lab_backup_stores(cfg: config.Config) -> list[str]:
    """Backup stores for the lab, made once: `local` (a directory on the SAN host) and one `ssh`
    store per lab backup host, logging in with the key the lab generated for it."""
    rt = make_runtime(cfg)
    topo = topology.build(cfg)
    stores = [BackupStore(name="local", kind="local", location=str((cfg.var_dir / "backups").resolve()))]
    for host in topo.backup_hosts():
        daemon = lab_cluster.backup_host(topo, host)
        host_key = (daemon.directory / "ssh_host_ed25519_key.pub").read_text().split()
        stores.append(BackupStore(name=host.name, kind="ssh", location=f"root@{daemon.address}:{daemon.store}",
                                  credentials={"private_key": daemon.client_key.read_text(),
                                               "host_key": f"{daemon.address} {host_key[0]} {host_key[1]}"}))
    try:
        with transaction(rt.sessions) as session:
            have = set(session.scalars(select(BackupStore.name)))
            session.add_all(store for store in stores if store.name not in have)
        return [store.name for store in stores]
    finally:
        rt.engine.dispose()


def first_jobs(cfg: config.Config, with_lab: bool) -> list[Job]:
    """Refresh every server and SAN, import `tiny` where a lab SAN lacks it; wait and return the jobs."""
    wanted: list[tuple[str, dict[str, Any]]] = [("refresh-servers", {})]
    wanted += [("refresh-san", {"san": san.name}) for _, san in cfg.sans()]
    if with_lab:
        tiny = build_tiny(cfg.import_dir / "tiny")  # imports read only from the import directory
        wanted += template_imports(cfg, "tiny", tiny.disk, tiny.boot_info(), "busybox")
    return run_jobs(cfg, wanted)


def template_imports(cfg: config.Config, name: str, disk: Path, boot: dict[str, Any],
                     os_name: str) -> list[tuple[str, dict[str, Any]]]:
    """The import-template jobs that register `disk` as template `name` on every SAN lacking it."""
    rt = make_runtime(cfg)
    try:
        with rt.sessions() as session:
            have = set(session.scalars(select(San.name).join(Template, Template.san_id == San.id)
                                       .where(Template.name == name)))
    finally:
        rt.engine.dispose()
    return [("import-template", {"name": name, "san": san.name, "source_path": str(disk.resolve()), "format": "raw",
                                 "os": os_name, "boot": boot})
            for _, san in cfg.sans() if san.name not in have]


def run_jobs(cfg: config.Config, wanted: list[tuple[str, dict[str, Any]]]) -> list[Job]:
    """Start the jobs (kind, params) as the launcher, wait for all and return them."""
    rt = make_runtime(cfg)
    celery = make_celery(cfg)
    try:
        submitted = [_start(rt, celery, kind, params) for kind, params in wanted]
        return [_wait(rt, job.id) for job in submitted]
    finally:
        celery.close()
        rt.engine.dispose()


def _start(rt, celery, kind: str, params: dict) -> Job:
    """Start the job, or, when an earlier run left one for the same target, send that one again."""
    try:
        return submission.start(rt, celery, kind, params, LAUNCHER)
    except TargetBusy as busy:
        with rt.sessions() as session:
            job = session.get(Job, busy.extra["job_id"])
    submission.launch(rt, celery, job)
    return job


def _wait(rt, job_id: str) -> Job:
    deadline = time.monotonic() + BOOTSTRAP_TIMEOUT_S
    while True:
        with rt.sessions() as session:
            job = session.get(Job, job_id)
        if job.is_final or time.monotonic() > deadline:
            return job
        time.sleep(0.5)
