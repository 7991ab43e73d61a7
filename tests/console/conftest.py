"""Console fixtures: the API served for real by gunicorn (as `laxcluster run` serves it), tokens, websocket helpers."""

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import websocket

from cli.services import api_argv
from lab.processes import free_port, wait_until
from tests.api.conftest import tokens  # noqa: F401  (a token for each role)

__all__ = ["tokens"]
REPO = Path(__file__).resolve().parents[2]
# What the tiny template prints once it has configured itself, and keeps in /etc/laxcluster-boot.
BOOT_LINE = re.compile(rb"LAXCLUSTER-BOOT hostname=(\S+) ip=(\S+)")
ASK_BOOT_LINE = b"cat /etc/laxcluster-boot\n"


@dataclass(frozen=True)
class ServedApi:
    url: str
    log: Path

    def console_url(self, vm: str) -> str:
        return self.url.replace("http", "ws", 1) + f"/vms/{vm}/console"


@pytest.fixture
def served_api(lax_env: dict[str, str], tmp_path: Path) -> Iterator[ServedApi]:
    """The API under gunicorn's threaded worker on a free port, on this test's DB and config; stopped by PID."""
    port = free_port()
    served = ServedApi(f"http://127.0.0.1:{port}", tmp_path / "api.log")
    with served.log.open("wb") as log:
        proc = subprocess.Popen(api_argv("127.0.0.1", port, threads=4), cwd=REPO, env={**os.environ, **lax_env},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: _healthy(proc, served), 60, "gunicorn to serve the API")
        yield served
    finally:
        _stop(proc)


def _healthy(proc: subprocess.Popen, served: ServedApi) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"gunicorn exited {proc.returncode}:\n{served.log.read_text()[-3000:]}")
    try:
        return requests.get(served.url + "/health", timeout=5).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def refused(url: str, token: str | None) -> tuple[int, dict]:
    """The status and problem+json body with which the API refuses a websocket upgrade at `url`."""
    headers = [f"Authorization: Bearer {token}"] if token else []
    with pytest.raises(websocket.WebSocketBadStatusException) as refusal:
        websocket.create_connection(url, header=headers, timeout=10).close()
    assert refusal.value.resp_headers["content-type"] == "application/problem+json"
    return refusal.value.status_code, json.loads(refusal.value.resp_body)


def open_console(api: ServedApi, vm: str, token: str) -> websocket.WebSocket:
    return websocket.create_connection(api.console_url(vm), header=[f"Authorization: Bearer {token}"], timeout=10)


def console_boot_line(api: ServedApi, vm: str, token: str, timeout: float = 120) -> tuple[str, str]:
    """(hostname, ip) of tiny guest `vm`'s boot line, asked for through the API's console websocket."""
    ws = open_console(api, vm, token)
    try:
        hostname, ip = ask_boot_line(ws, timeout)
        return hostname.decode(), ip.decode()
    finally:
        ws.close()


def ask_boot_line(ws: websocket.WebSocket, timeout: float = 120) -> tuple[bytes, bytes]:
    """Ask the guest's shell for its boot line through `ws` until the guest has booted and answers."""
    seen = b""

    def asked() -> re.Match | None:
        nonlocal seen
        ws.send_bytes(ASK_BOOT_LINE)
        seen += receive_for(ws, 2.0)
        return BOOT_LINE.search(seen)

    return wait_until(asked, timeout, "the boot line through the console websocket").groups()


def receive_for(ws: websocket.WebSocket, seconds: float) -> bytes:
    """What `ws` brings within `seconds`."""
    received = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ws.settimeout(left)
        try:
            received += ws.recv_data()[1]
        except websocket.WebSocketTimeoutException:
            break
    return received
