"""A VM's serial console in the page: xterm.js (from npm) over a websocket that the page's own session opens.

The websocket is the API's console relay (api.console) behind the console's session instead of a bearer
header, which a browser cannot send on a websocket: an operator's session, and an `Origin` of this very
host, so no other site can open it with the visitor's cookie.
"""

from flask import Response, render_template

from api import validation
from api.console import relay_console
from api.ui import blueprint, signin


@blueprint.get("/vms/<name>/console")
def console_page(name: str) -> str:
    signin.require("operator")
    return render_template("console.html", name=validation.name(name, "name"))


@blueprint.get("/vms/<name>/console/socket", websocket=True)
@blueprint.get("/vms/<name>/console/socket")
def console_socket(name: str) -> Response:
    signin.check_socket("the console")
    return relay_console(validation.name(name, "name"))
