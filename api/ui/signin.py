"""Who uses the web console: an API token given once at sign-in, kept in Flask's signed session cookie
(HttpOnly, SameSite=Strict), checked like a bearer token on every request (so a revoked or expired token
ends the session at once), and a CSRF token per session that every form post and htmx request must carry.
"""

import hmac
import os
import secrets
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, g, request, session

from api.auth import Caller, authenticate
from errors import Forbidden, Unauthorized, UpgradeRequired
from models import ROLES

CSRF_FIELD, CSRF_HEADER = "csrf", "X-CSRF-Token"
SECRET_FILE = "ui-secret"


def configure(app: Flask, var_dir: Path, secret: str | None) -> None:
    """Sign the session cookie with `secret` (`[api] secret_key`), else with a key kept in `var_dir`, shared by
    every API process on the machine; the cookie is HttpOnly and SameSite=Strict."""
    app.secret_key = secret or _machine_secret(var_dir)
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_NAME="laxcluster")


def _machine_secret(var_dir: Path) -> str:
    path = var_dir / SECRET_FILE
    if not path.exists():
        var_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{secrets.token_hex(4)}")
        partial.write_text(secrets.token_hex(32))
        partial.chmod(0o600)
        # A link, not a rename: when API processes start together, the first key stays and all read it.
        with suppress(FileExistsError):
            os.link(partial, path)
        partial.unlink()
    return path.read_text().strip()


def sign_in(token: str) -> Caller:
    """Check `token` like a bearer token (Unauthorized, TokenRevoked, TokenExpired) and start a session with it."""
    caller = authenticate(f"Bearer {token.strip()}")
    session.clear()
    session.update(token=token.strip(), csrf=secrets.token_urlsafe(32))
    return caller


def sign_out() -> None:
    session.clear()


def signed_in() -> Caller:
    """The caller of this session; Unauthorized without one."""
    if "token" not in session:
        raise Unauthorized("sign in with an API token")
    g.caller = authenticate(f"Bearer {session['token']}")
    return g.caller


def csrf_token() -> str:
    """This session's CSRF token (a fresh one for the sign-in form before there is a session)."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def check_csrf() -> None:
    """Forbidden unless the post carries this session's CSRF token (form field or htmx header)."""
    sent = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    if not hmac.compare_digest(sent.encode(), session.get("csrf", "").encode()) or not sent:
        raise Forbidden("the form is stale or forged (no valid CSRF token): reload the page and try again")


def check_socket(what: str) -> None:
    """What a console's websocket needs: an operator's session, an upgrade, and this site's own page asking."""
    require("operator")
    if not request.url_rule.websocket:
        raise UpgradeRequired(f"{what} is a websocket")
    check_same_origin()


def check_same_origin() -> None:
    """Forbidden unless the request comes from this site's own pages (a websocket carries no CSRF token, and a
    browser sends the cookie with it)."""
    origin = request.headers.get("Origin", "")
    if urlsplit(origin).netloc != request.host:
        raise Forbidden(f"this opens only from this site's own pages, not from {origin or 'no origin'}")


def may(caller: Caller, role: str) -> bool:
    return ROLES.index(caller.role) >= ROLES.index(role)


def require(role: str) -> Caller:
    caller = g.caller
    if not may(caller, role):
        raise Forbidden(f"this needs role {role}; token {caller.name} has role {caller.role}", required_role=role)
    return caller
