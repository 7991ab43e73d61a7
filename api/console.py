"""The serial console of a VM as a websocket: `GET /vms/<name>/console` relays bytes both ways
between the client and the domain's console on its server, read through a libvirt stream.

A console is a live byte stream, so it cannot go through the job queue: this is the one route
that talks to a cluster server itself. Everything that can refuse a console (token, every stream
slot taken (api.streams), unknown VM, VM not running, server unreachable) is checked before the
upgrade, so a refusal is an ordinary problem+json answer. The relay ends when either side closes;
the libvirt stream and connection are closed, and the slot given back, when the request ends,
whatever happened. Opening a console takes it over from any session already attached (the earlier
one sees its websocket close).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import libvirt
from flask import Blueprint, Response, request
from simple_websocket import ConnectionClosed, Server
from sqlalchemy import select

from api import context, streams, validation
from api.openapi import operation
from errors import ServerUnreachable, UpgradeRequired, VmNotFound, VmNotRunning
from models import ClusterServer, San, Template, VirtualMachine
from tasks.inventory.vms import MAINTENANCE
from workers.node.console import CHUNK, SerialConsole, start_event_loop
from workers.node.host import connect

blueprint = Blueprint("console", __name__)
# How long the relay waits for keystrokes before it looks for console output again.
POLL_S = 0.05


@dataclass
class Attached:
    """An open console of a running domain and the libvirt connection it is read through."""

    conn: libvirt.virConnect
    console: SerialConsole

    def close(self) -> None:
        self.console.close()
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass  # a connection whose server went away has nothing left to release


class SocketTakenOver(Response):
    """The answer of a view that served a websocket on the request's own socket: nothing more goes out on it."""

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if "gunicorn.socket" in environ:
            # gunicorn drops the connection without writing a response when the app raises StopIteration.
            raise StopIteration
        return super().__call__(environ, start_response)


# werkzeug routes websocket handshakes only to websocket rules, so the path has one of each: the
# plain one answers 426 (after the token check, like every route).
@blueprint.get("/vms/<name>/console", websocket=True)
@blueprint.get("/vms/<name>/console")
@operation("The VM's serial console as a websocket: binary messages both ways, keystrokes in, console output out; "
           "ends when either side closes; 503 TooManyStreams (with Retry-After) while every stream slot is taken",
           role="operator", status=101, media_type="application/octet-stream")
def console(name: str) -> Response:
    if not request.url_rule.websocket:
        raise UpgradeRequired("the console is a websocket: connect with `Upgrade: websocket` (laxcluster vm console)")
    return relay_console(name)


def relay_console(name: str) -> Response:
    """Attach to VM `name`'s console (every refusal comes before the upgrade) and relay it over this request's
    websocket until either side closes; the web console's page uses it too."""
    with streams.claim():
        attached = attach(name)
        try:
            serve(attached)
        finally:
            attached.close()
    return SocketTakenOver()


def serve(attached: Attached) -> None:
    """Upgrade the request to a websocket and relay between it and the console until either side closes."""
    ws = Server.accept(request.environ)
    try:
        relay(ws, attached.console)
    finally:
        close_websocket(ws)


def close_websocket(ws: Server) -> None:
    try:
        ws.close()
    except ConnectionClosed:
        pass  # the client closed it first


def attach(name: str) -> Attached:
    """The console of running VM `name` on its server (or its SAN host, in maintenance); VmNotFound, VmNotRunning
    or ServerUnreachable if there is none."""
    uuid, server, uri = where_it_runs(name)
    # Stream data only flows on connections opened after libvirt's event loop runs.
    start_event_loop()
    conn = connect(uri)
    try:
        return Attached(conn, SerialConsole(running_domain(conn, uuid, name, server)))
    except BaseException:
        conn.close()
        raise


def where_it_runs(name: str) -> tuple[str, str, str]:
    """VM `name`'s UUID, and the name and libvirt URI of its server (or its SAN host, in maintenance);
    VmNotFound, or VmNotRunning if it is on no server."""
    validation.name(name, "name")
    with context.session() as db:
        row = db.execute(select(VirtualMachine.uuid, VirtualMachine.state, ClusterServer.name, ClusterServer.libvirt_uri,
                                San.name)
                         .outerjoin(ClusterServer, VirtualMachine.server_id == ClusterServer.id)
                         .outerjoin(Template, VirtualMachine.template_id == Template.id)
                         .outerjoin(San, Template.san_id == San.id)
                         .where(VirtualMachine.name == name)).first()
    if row is None:
        raise VmNotFound(f"no VM {name}", vm=name)
    uuid, state, server, uri, san = row
    if state == MAINTENANCE:
        # It runs on its SAN host, whose libvirt the config names.
        server, uri = san, context.runtime().config.san(san)[1].uri
    if uri is None:
        raise VmNotRunning(f"VM {name} is on no server, so it is not running", vm=name)
    return uuid, server, uri


def running_domain(conn: libvirt.virConnect, uuid: str, name: str, server: str) -> libvirt.virDomain:
    """VM `name`'s domain on `conn` if it runs there; VmNotRunning if it does not."""
    try:
        domain = conn.lookupByUUIDString(uuid)
        if domain.isActive():
            return domain
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise ServerUnreachable(f"libvirt on {server} failed: {error.get_error_message()}", server=server) from None
    raise VmNotRunning(f"VM {name} is not running on {server}", vm=name, server=server)


def relay(ws: Server, console: SerialConsole) -> None:
    """Copy what `ws` receives to `console` and the console's output to `ws` until either side closes."""
    try:
        while True:
            keys = ws.receive(timeout=POLL_S)
            if keys:
                console.write(keys.encode() if isinstance(keys, str) else keys)
            output, still_open = console_output(console)
            if output:
                ws.send(output)
            if not still_open:
                return
    except (ConnectionClosed, OSError):
        return  # the client left
    except libvirt.libvirtError:
        return  # the domain went away under its console


def console_output(console: SerialConsole) -> tuple[bytes, bool]:
    """The console's output waiting now (maybe b""), and whether the console is still open."""
    chunks = []
    while True:
        # Raw bytes from the stream: SerialConsole.text is decoded for matching, not for relaying.
        data = console.stream.recv(CHUNK)
        if data == -2:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), False
        chunks.append(data)
