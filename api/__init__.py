"""The LaxCluster HTTP API: a thin Flask layer over the inventory DB and the job queue.

`create_app()` builds the app; gunicorn's threaded worker (see `laxcluster run`) serves it. Every route needs a
bearer token except `GET /health`; errors are problem+json; `GET /openapi.json` describes it all. The web
console under `/ui/` (api.ui) is served by the same app, signed in with a session cookie instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

from api import (audit, auth, backups, check, console, disks, dr, health, ipam, jobs, metrics, openapi, problems, servers,
                 storage, streams, tokens, topology, ui, vms)
from api.context import EXTENSION

if TYPE_CHECKING:
    from celery import Celery

    from tasks.runtime import Runtime

BLUEPRINTS = (health.blueprint, openapi.blueprint, jobs.blueprint, servers.blueprint,
              topology.sites, topology.clusters, storage.sans, storage.volumes, storage.templates,
              ipam.subnets, ipam.leases, vms.blueprint, disks.blueprint, console.blueprint,
              backups.backups, backups.stores, backups.policies, tokens.blueprint,
              audit.blueprint, check.blueprint, metrics.blueprint, dr.blueprint)


def create_app(rt: Runtime | None = None, celery: Celery | None = None) -> Flask:
    """The API app on runtime `rt` (default: this process's) sending jobs through `celery` (default: tasks.app)."""
    if rt is None:
        from tasks.runtime import current

        rt = current()
    if celery is None:
        from tasks.app import app as celery
    settings = rt.config.section("api")
    app = Flask(__name__, static_folder=None)
    app.config.update(SSE_KEEPALIVE_S=float(settings.get("sse_keepalive_s", 15.0)))
    app.json.sort_keys = False
    app.extensions[EXTENSION] = {"runtime": rt, "celery": celery,
                                 "streams": streams.StreamSlots(int(settings.get("max_streams", 4)))}
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    ui.register(app, rt.config.var_dir, settings.get("secret_key"))
    problems.register(app)
    metrics.record_latency(app)
    auth.register(app)
    return app
