"""`laxcluster vm console NAME`: a VM's serial console in this terminal, through the API's websocket.

On a terminal, keys go to the guest as typed (raw mode: Ctrl-C too) and Ctrl-] leaves; the
terminal's settings come back however the session ends. Without a terminal (pipes), stdin is
sent as it comes and its end leaves as well.
"""

import json
import os
import select
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import click
import websocket

from cli.client import CONNECT_TIMEOUT_S, ApiError, Client, api

ESCAPE = b"\x1d"  # Ctrl-]
READ_SIZE = 4096


@click.command("console")
@click.argument("name")
def console(name: str) -> None:
    """Attach to VM NAME's serial console (read and write); Ctrl-] leaves."""
    ws = open_console(api(), name)
    click.echo(f"connected to the console of {name}; Ctrl-] leaves", err=True)
    try:
        with raw_terminal(sys.stdin.fileno()):
            relay(ws, sys.stdin.fileno(), sys.stdout.fileno())
    finally:
        ws.close()
    click.echo(f"\nleft the console of {name}", err=True)


def open_console(client: Client, name: str) -> websocket.WebSocket:
    """A websocket on VM `name`'s console; ApiError with the API's problem code if it refuses."""
    url = client.base_url.rstrip("/").replace("http", "ws", 1) + f"/vms/{quote(name, safe='')}/console"
    headers = [f"Authorization: Bearer {client.token}"] if client.token else []
    try:
        ws = websocket.create_connection(url, header=headers, timeout=CONNECT_TIMEOUT_S)
    except websocket.WebSocketBadStatusException as error:
        raise refusal(error.status_code, error.resp_body) from None
    except (OSError, websocket.WebSocketException) as error:
        raise ApiError("Unreachable", f"cannot reach the LaxCluster API at {client.base_url} ({error})") from None
    # The console may stay quiet for as long as the operator likes.
    ws.settimeout(None)
    return ws


def refusal(status: int, body: bytes | None) -> ApiError:
    """The ApiError for a refused upgrade, from its problem+json body when it has one."""
    try:
        problem: Any = json.loads(body or b"")
    except ValueError:
        problem = None
    if isinstance(problem, dict) and "code" in problem:
        return ApiError(str(problem["code"]), str(problem.get("detail", "")), status, problem)
    return ApiError(f"HTTP{status}", (body or b"").decode(errors="replace").strip()[:300], status)


@contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Put terminal `fd` in raw mode for the block and restore it after, also on SIGTERM or SIGHUP; no-op off a terminal."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    handlers = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _exit_on_signal(sig: int, _frame: object) -> None:
    # Raising unwinds through raw_terminal's finally, which restores the terminal.
    raise SystemExit(128 + sig)


def relay(ws: websocket.WebSocket, stdin_fd: int, stdout_fd: int) -> None:
    """Copy `stdin_fd` to the console and the console to `stdout_fd` until Ctrl-], the end of stdin, or the console closes."""
    while True:
        readable, _, _ = select.select([stdin_fd, ws.sock], [], [])
        if ws.sock in readable and not show_output(ws, stdout_fd):
            return
        if stdin_fd in readable and not send_keys(ws, os.read(stdin_fd, READ_SIZE)):
            return


def show_output(ws: websocket.WebSocket, stdout_fd: int) -> bool:
    """Write one message of console output to `stdout_fd`; False once the console has closed."""
    try:
        opcode, data = ws.recv_data()
    except websocket.WebSocketConnectionClosedException:
        return False
    if opcode == websocket.ABNF.OPCODE_CLOSE:
        return False
    write_all(stdout_fd, data)
    return True


def send_keys(ws: websocket.WebSocket, keys: bytes) -> bool:
    """Send `keys` up to a Ctrl-]; False when the session should end (Ctrl-] or end of input)."""
    wanted, escape, _ = keys.partition(ESCAPE)
    if wanted:
        ws.send_bytes(wanted)
    return bool(keys) and not escape


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
