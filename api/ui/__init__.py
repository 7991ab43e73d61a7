"""The web console under `/ui/`: server-rendered pages (Jinja) made live with htmx, served by the API process.

It is not part of the JSON API (no OpenAPI entry, no bearer header): a session cookie from signing in with an
API token authenticates it (api.ui.signin), every post carries the session's CSRF token, and each action
checks the caller's role on the server whatever the page showed. Jobs are started through the same
validation and submission as the API's routes. htmx comes from npm at `make setup` (api/ui/package.json and
its lock file), never from a CDN.
"""

from pathlib import Path

from flask import Blueprint, Flask, Response, abort, g, redirect, render_template, request, send_from_directory, url_for

from api.openapi import CONSOLE
from api.ui import signin
from errors import LaxError, TokenExpired, TokenRevoked, Unauthorized

HERE = Path(__file__).parent
# The vendored files the pages load, by the name they are served under.
MODULES = HERE / "node_modules"
VENDOR = {"htmx.min.js": MODULES / "htmx.org" / "dist" / "htmx.min.js",
          "xterm.js": MODULES / "@xterm" / "xterm" / "lib" / "xterm.js",
          "xterm.css": MODULES / "@xterm" / "xterm" / "css" / "xterm.css"}
NOVNC = MODULES / "@novnc" / "novnc"
VIEWER_POSTS = frozenset({"ui.sign_out"})  # every other post changes something: the operator role
OPEN_ENDPOINTS = frozenset({"ui.sign_in", "ui.sign_in_form", "ui.vendor", "ui.novnc", "ui.static"})

blueprint = Blueprint(CONSOLE, __name__, url_prefix="/ui", template_folder="templates", static_folder="static")


def register(app: Flask, var_dir: Path, secret: str | None) -> None:
    from api.ui import actions, console, pages, screen  # noqa: F401  (their routes join the blueprint)

    signin.configure(app, var_dir, secret)
    app.register_blueprint(blueprint)


@blueprint.before_request
def authenticate_session() -> Response | None:
    """Pages need a session (else the sign-in page); posts need its CSRF token and, but sign-out, an operator."""
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    try:
        signin.signed_in()
    except (Unauthorized, TokenRevoked, TokenExpired):
        signin.sign_out()
        if request.method == "GET" and not request.headers.get("HX-Request"):
            return redirect(url_for("ui.sign_in_form", next=request.path))
        raise
    if request.method == "POST":
        signin.check_csrf()
        if request.endpoint not in VIEWER_POSTS:
            signin.require("operator")
    return None


@blueprint.context_processor
def page_context() -> dict:
    caller = g.get("caller")
    return {"caller": caller, "csrf": signin.csrf_token(), "may_operate": bool(caller and signin.may(caller, "operator"))}


@blueprint.errorhandler(LaxError)
def problem_page(error: LaxError) -> tuple[str, int]:
    """A refusal as the problem+json message, in the page (or in the htmx target that asked)."""
    template = "_problem.html" if request.headers.get("HX-Request") else "problem.html"
    return render_template(template, error=error), error.http_status


@blueprint.app_template_filter("mib")
def mib(size: int | None) -> str:
    """Bytes as the original showed memory and disk: in MB (MiB), or empty when unknown."""
    return "" if size is None else f"{size / (1 << 20):,.0f} MB"


@blueprint.app_template_filter("seconds")
def seconds(nanoseconds: int | None) -> str:
    return "" if nanoseconds is None else f"{nanoseconds / 1e9:.1f} s"


@blueprint.get("/vendor/<name>")
def vendor(name: str) -> Response:
    path = VENDOR.get(name)
    if path is None or not path.exists():
        abort(404)
    mimetype = "text/css" if path.suffix == ".css" else "text/javascript"
    return send_from_directory(path.parent, path.name, mimetype=mimetype, max_age=3600)


@blueprint.get("/vendor/novnc/<path:path>")
def novnc(path: str) -> Response:
    """noVNC's ES modules (its core and the vendored inflate it imports), as the package ships them."""
    if not path.endswith(".js"):
        abort(404)
    return send_from_directory(NOVNC, path, mimetype="text/javascript", max_age=3600)
