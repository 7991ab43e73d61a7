"""The console's pages and the fragments htmx refreshes in them: the overview (tree and VM table), a VM,
the install form, the jobs list and one job. Everything shown is read as the JSON API reads it."""

from typing import Any

from flask import Response, render_template, request
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from api import context, validation
from api.jobs import event_stream
from api.backups import backup_json, backups_query, policy_json, store_json
from api.representations import job_json, server_json
from api.storage import san_facts_json
from api.vms import RUNNING_SOMEWHERE, overview_lines, overview_query, vm_detail
from api.ui import blueprint
from errors import NotFound
from models import FINAL_STATES, Cluster, ClusterServer, Job, San, Site, Subnet, Template, VirtualMachine
from models.protection import Backup, BackupPolicy, BackupStore, Replication
from tasks.inventory import dr

JOBS_SHOWN = 50
BACKUPS_SHOWN = 200
VMS_SHOWN = 1000


@blueprint.get("/")
def overview() -> str:
    with context.session() as db:
        return render_template("overview.html", tree=_tree(db), **_vm_tables(db))


@blueprint.get("/fragments/tree")
def tree() -> str:
    with context.session() as db:
        return render_template("_tree.html", tree=_tree(db))


@blueprint.get("/fragments/vms")
def vm_tables() -> str:
    with context.session() as db:
        return render_template("_vms.html", **_vm_tables(db))


def _vm_tables(db) -> dict[str, list[dict[str, Any]]]:
    lines = overview_lines(db, db.execute(overview_query().order_by(VirtualMachine.name).limit(VMS_SHOWN)).all())
    return {"active": [vm for vm in lines if vm["state"] in RUNNING_SOMEWHERE],
            "inactive": [vm for vm in lines if vm["state"] not in RUNNING_SOMEWHERE]}


def _tree(db) -> list[dict[str, Any]]:
    """Sites, each with its SANs (free space) and clusters with their servers (live properties)."""
    servers = db.scalars(select(ClusterServer).options(joinedload(ClusterServer.cluster).joinedload(Cluster.site))
                         .order_by(ClusterServer.name))
    by_cluster: dict[int, list[dict[str, Any]]] = {}
    for server in servers:
        by_cluster.setdefault(server.cluster_id, []).append(server_json(server))
    sans = db.scalars(select(San).options(joinedload(San.site)).order_by(San.name)).all()
    return [{"name": site.name, "sans": [san_facts_json(san) for san in sans if san.site_id == site.id],
             "clusters": [{"name": cluster.name, "servers": by_cluster.get(cluster.id, [])}
                          for cluster in sorted(site.clusters, key=lambda c: c.name)]}
            for site in db.scalars(select(Site).order_by(Site.name))]


@blueprint.get("/vms/<name>")
def vm_page(name: str) -> str:
    validation.name(name, "name")
    with context.session() as db:
        vm = vm_detail(db, name)
        jobs = db.scalars(select(Job).where(Job.target == f"vm/{name}", Job.parent_id.is_(None))
                          .order_by(Job.created_at.desc()).limit(JOBS_SHOWN))
        backups = db.scalars(select(Backup).where(Backup.vm_name == name).order_by(Backup.created_at.desc()))
        servers = db.scalars(select(ClusterServer.name).order_by(ClusterServer.name))
        return render_template("vm.html", vm=vm, jobs=[job_json(job) for job in jobs], backups=list(backups),
                               servers=[server for server in servers if server != vm["server"]],
                               replication=replication_status(db, name))


def replication_status(db, name: str) -> dict[str, Any] | None:
    """The VM's DR replication as `GET /vms/<name>/replication` shows it; None when it is not replicated."""
    vm = db.scalar(select(VirtualMachine).where(VirtualMachine.name == name))
    rep = db.scalar(select(Replication).where(Replication.vm_id == vm.id))
    return dr.status(db, vm, rep) if rep is not None else None


@blueprint.get("/backups")
def backups_page() -> str:
    """Backups (newest first), the stores they go to and the policies that take them."""
    with context.session() as db:
        backups = db.execute(backups_query().order_by(Backup.created_at.desc(), Backup.id).limit(BACKUPS_SHOWN))
        stores = db.scalars(select(BackupStore).order_by(BackupStore.name))
        policies = db.execute(select(BackupPolicy, BackupStore.name).join(BackupStore).order_by(BackupPolicy.name))
        return render_template("backups.html", backups=[backup_json(*row) for row in backups],
                               stores=[store_json(store) for store in stores],
                               policies=[policy_json(*row) for row in policies])


@blueprint.get("/install")
def install_form() -> str:
    with context.session() as db:
        rows = db.execute(select(Template.name, Site.name).join(San, Template.san_id == San.id)
                          .join(Site, San.site_id == Site.id).order_by(Template.name, Site.name)).all()
        subnets = db.scalars(select(Subnet.name).order_by(Subnet.name)).all()
        servers = db.scalars(select(ClusterServer.name).order_by(ClusterServer.name)).all()
    # A template is asked for by name: the chosen server's site (or the first site that has it) gives it.
    templates: dict[str, list[str]] = {}
    for template, site in rows:
        templates.setdefault(template, []).append(site)
    return render_template("install.html", templates=templates, subnets=subnets, servers=servers,
                           default_subnet=context.runtime().config.raw.get("default_subnet"))


@blueprint.get("/jobs")
def jobs_page() -> str:
    return render_template("jobs.html", jobs=_recent_jobs())


@blueprint.get("/fragments/jobs")
def jobs_table() -> str:
    return render_template("_jobs.html", jobs=_recent_jobs())


def _recent_jobs() -> list[dict[str, Any]]:
    with context.session() as db:
        rows = db.scalars(select(Job).where(Job.parent_id.is_(None)).order_by(Job.created_at.desc()).limit(JOBS_SHOWN))
        return [job_json(job) for job in rows]


@blueprint.get("/jobs/<job_id>")
def job_page(job_id: str) -> str:
    return render_template("job.html", job=_job(job_id), final=FINAL_STATES)


@blueprint.get("/jobs/<job_id>/events")
def job_events(job_id: str) -> Response:
    """The job's progress as the API's Server-Sent Events, for its page."""
    return event_stream(job_id)


@blueprint.get("/fragments/jobs/<job_id>")
def job_progress(job_id: str) -> str:
    return render_template("_job.html", job=_job(job_id), final=FINAL_STATES, polled=request.headers.get("HX-Request"))


def _job(job_id: str) -> dict[str, Any]:
    with context.session() as db:
        job = db.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}", job_id=job_id)
        return job_json(job)
