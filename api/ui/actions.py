"""What the console's forms do: sign in and out, install, power actions, migrate, back up, delete, cancel.

Each post but sign-out needs the operator role, checked on the server by the blueprint's hook (a viewer's page
shows no buttons, and a viewer's post is refused anyway); each one validates like the JSON API (the same functions build the job parameters), starts the job
and shows its page, where its progress follows live.
"""

from typing import Any

from flask import Response, redirect, render_template, request, url_for

from api import context
from api.backups import backup_named, backup_params
from api.changes import start_job
from api.ui import blueprint, signin
from api.vms import action_params, install_request, vm_named
from errors import InvalidInput, LaxError
from models import Job
from tasks import submission
from tasks.inventory import vms

POWER_ACTIONS = ("start", "shutdown", "reboot", "destroy")


@blueprint.get("/signin")
def sign_in_form() -> str:
    return render_template("signin.html", next=request.args.get("next", ""))


@blueprint.post("/signin")
def sign_in() -> Response | tuple[str, int]:
    # Open to callers without a session, but the form must carry the CSRF token its page was given.
    signin.check_csrf()
    try:
        signin.sign_in(request.form.get("token", ""))
    except LaxError as error:
        return render_template("signin.html", error=error, next=request.form.get("next", "")), error.http_status
    wanted = request.form.get("next", "")
    return redirect(wanted if wanted.startswith("/ui/") else url_for("ui.overview"), 303)


@blueprint.post("/signout")
def sign_out() -> Response:
    signin.sign_out()
    return redirect(url_for("ui.sign_in_form"), 303)


@blueprint.post("/install")
def install() -> Response:
    wanted = install_request(_install_body(request.form))
    config = context.runtime().config
    job = start_job("install-vm", {"vm": wanted.name, "disk_bytes": wanted.disk_bytes, "server": wanted.server},
                    prepare=lambda db: vms.reserve_vm(db, config, wanted))
    return _to_job(job)


@blueprint.post("/install/check")
def install_check() -> str:
    """The install form's live validation: everything the install would check now (the fields, a free name, the
    template, an address), reserved in a transaction that is rolled back; the answer is the fragment to show."""
    try:
        wanted = install_request(_install_body(request.form))
        with context.runtime().sessions() as db:
            try:
                vms.reserve_vm(db, context.runtime().config, wanted)
            finally:
                db.rollback()
    except LaxError as error:
        return render_template("_problem.html", error=error)
    return render_template("_install_ready.html", wanted=wanted)


def _install_body(form: Any) -> dict[str, Any]:
    """The install form as the API's JSON body: numbers as numbers, keys one per line, empty fields left out."""
    body: dict[str, Any] = {key: form[key] for key in ("name", "template", "memory", "disk", "subnet", "server",
                                                       "description") if form.get(key)}
    body["ha"] = form.get("ha") == "on"
    body["ssh_keys"] = [line for line in form.get("ssh_keys", "").splitlines() if line.strip()]
    if form.get("vcpus"):
        if not form["vcpus"].isdigit():
            raise InvalidInput("vcpus must be a whole number", field="vcpus")
        body["vcpus"] = int(form["vcpus"])
    return body


@blueprint.post("/vms/<name>/actions/<action>")
def act(name: str, action: str) -> Response:
    if action == "backup":
        with context.session() as db:
            return _to_job(start_job("snapshot-backup", backup_params(db, name, {"mode": request.form.get("mode", "full")})))
    if action == "migrate":
        body = {"check": request.form.get("check") == "1", **({"to": request.form["to"]} if request.form.get("to") else {})}
        return _to_job(start_job("migrate", action_params(name, "migrate", body)))
    if action not in POWER_ACTIONS:
        raise InvalidInput(f"the console has no action {action!r}", field="action")
    return _to_job(start_job(action, action_params(name, action, {})))


@blueprint.post("/vms/<name>/delete")
def delete(name: str) -> Response:
    if request.form.get("confirm") != name:
        raise InvalidInput(f"type the VM's name ({name}) to confirm its deletion", field="confirm")
    with context.session() as db:
        vm_named(db, name)
    return _to_job(start_job("delete-vm", {"vm": name}))


@blueprint.post("/backups/<backup_id>/verify")
def verify_backup(backup_id: str) -> Response:
    with context.session() as db:
        backup_named(db, backup_id)
    return _to_job(start_job("verify-backup", {"backup": backup_id}))


@blueprint.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Response:
    job = submission.cancel(context.runtime(), context.celery(), job_id)
    return _to_job(job)


def _to_job(job: Job) -> Response:
    return redirect(url_for("ui.job_page", job_id=job.id), 303)
