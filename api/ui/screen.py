"""A VM's graphical console in the page: noVNC (from npm) talking RFB over a websocket that this process relays
to the domain's VNC display on its server's management address (tasks.node.domains.vnc_display puts it there,
behind the VM's own password, which the page hands noVNC).

Like the serial console, the websocket needs an operator's session and an `Origin` of this very host.
"""

import select
import socket

from flask import Response, render_template, request
from simple_websocket import ConnectionClosed, Server

from api import streams, validation
from api.console import SocketTakenOver, close_websocket, where_it_runs
from api.ui import blueprint, signin
from errors import ServerUnreachable, VmNotRunning
from workers.node import domains

CHUNK = 64 * 1024
POLL_S = 0.02
CONNECT_TIMEOUT_S = 5


@blueprint.get("/vms/<name>/screen")
def screen_page(name: str) -> str:
    signin.require("operator")
    _, _, password = _display(validation.name(name, "name"))
    return render_template("screen.html", name=name, password=password)


@blueprint.get("/vms/<name>/screen/socket", websocket=True)
@blueprint.get("/vms/<name>/screen/socket")
def screen_socket(name: str) -> Response:
    signin.check_socket("the graphical console")
    address, port, _ = _display(validation.name(name, "name"))
    with streams.claim():
        try:
            display = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S)
        except OSError as error:
            raise ServerUnreachable(f"the VNC display of {name} at {address}:{port} does not answer: {error}") from None
        try:
            ws = Server.accept(request.environ)
            try:
                relay(ws, display)
            finally:
                close_websocket(ws)
        finally:
            display.close()
    return SocketTakenOver()


def _display(name: str) -> tuple[str, int, str]:
    uuid, server, uri = where_it_runs(name)
    found = domains.vnc_display(uri, uuid)
    if found is None:
        raise VmNotRunning(f"VM {name} has no running graphical console on {server}", vm=name, server=server)
    return found


def relay(ws: Server, display: socket.socket) -> None:
    """Copy bytes between the browser's websocket and the VNC display until either side closes."""
    display.setblocking(False)
    try:
        while True:
            data = ws.receive(timeout=POLL_S)
            if data:
                display.setblocking(True)
                display.sendall(data.encode() if isinstance(data, str) else data)
                display.setblocking(False)
            readable, _, _ = select.select([display], [], [], 0)
            if readable:
                chunk = display.recv(CHUNK)
                if not chunk:
                    return
                ws.send(chunk)
    except (ConnectionClosed, OSError):
        return  # either side left
