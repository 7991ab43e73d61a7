"""The console end to end on the lab: a tiny guest on cs1, the API under gunicorn, a websocket client and the CLI."""

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from select import select as ready_to_read

import libvirt
import pytest
import websocket
from sqlalchemy import select

from lab.processes import wait_until
from lab.template import TinyTemplate
from models import ClusterServer, VirtualMachine
from models.db import transaction
from tasks.inventory.config_sync import sync_from_config
from tests.fixtures.console import ASK_BOOT_LINE, BOOT_LINE, ask_boot_line, open_console, refused
from tests.support import REPO, need_binary
from workers.node.domain_xml import DirectBoot, DomainSpec, FileDisk, Nic, domain_xml
from workers.node.host import connect
from workers.san.seed import make_seed

pytestmark = [pytest.mark.integration, pytest.mark.lab]
MAC = "52:54:00:4c:58:09"
LAXCLUSTER = Path(sys.executable).with_name("laxcluster")


@dataclass(frozen=True)
class Guest:
    vm: str
    domain: libvirt.virDomain


@pytest.fixture
def cs1(rt) -> Iterator[libvirt.virConnect]:
    """A connection to cs1's libvirtd, with the lab's sites, clusters and servers in the inventory."""
    with transaction(rt.sessions) as session:
        sync_from_config(session, rt.config)
    uri = next(server.uri for _, _, server in rt.config.servers() if server.name == "cs1")
    conn = connect(uri)
    yield conn
    conn.close()


@pytest.fixture
def guest(rt, cs1: libvirt.virConnect, tiny: TinyTemplate, tmp_path: Path) -> Iterator[Guest]:
    """tiny running on cs1 as hostname con1 at 192.0.2.9, its VM row placed there; destroyed and undefined after."""
    need_binary("mkfs.vfat", "mcopy")
    name = f"con-{secrets.token_hex(3)}"
    root = tmp_path / "root.img"
    shutil.copyfile(tiny.disk, root)
    seed = make_seed(tmp_path / "seed.img", hostname="con1", mac=MAC, ip_cidr="192.0.2.9/24", gateway=None, ssh_keys=[])
    spec = DomainSpec(name=name, uuid=str(uuid.uuid4()), memory_bytes=256 << 20, vcpus=1, hypervisor="qemu",
                      disks=(FileDisk(root, readonly=False),), seed=FileDisk(seed), nics=(Nic(MAC),),
                      boot=DirectBoot(tiny.kernel, tiny.initrd, tiny.cmdline))
    domain = cs1.defineXML(domain_xml(spec))
    try:
        domain.create()
        with transaction(rt.sessions) as session:
            server_id = session.scalar(select(ClusterServer.id).where(ClusterServer.name == "cs1"))
            session.add(VirtualMachine(name=name, uuid=spec.uuid, server_id=server_id, memory_bytes=spec.memory_bytes,
                                       vcpus=1, state="running"))
        yield Guest(name, domain)
    finally:
        if domain.isActive():
            domain.destroy()
        domain.undefine()


def test_the_console_relays_the_guest_shell_and_closes_when_taken_over_or_the_guest_goes(rt, guest, served_api, tokens):
    first = open_console(served_api, guest.vm, tokens["operator"])
    try:
        assert ask_boot_line(first) == (b"con1", b"192.0.2.9")
        second = open_console(served_api, guest.vm, tokens["operator"])
        try:
            wait_until(lambda: closed(first), 30, "the first console to close when a second one takes over")
            assert ask_boot_line(second) == (b"con1", b"192.0.2.9")
            guest.domain.destroy()
            wait_until(lambda: closed(second), 30, "the console websocket to close after the guest was destroyed")
        finally:
            second.close()
    finally:
        first.close()
    # Each relay ended quietly when its console went away.
    assert "Traceback" not in served_api.log.read_text()


def test_a_vm_whose_domain_is_gone_is_not_running(rt, cs1, served_api, tokens):
    with transaction(rt.sessions) as session:
        server_id = session.scalar(select(ClusterServer.id).where(ClusterServer.name == "cs1"))
        session.add(VirtualMachine(name="ghost", server_id=server_id, memory_bytes=256 << 20, vcpus=1, state="running"))
    status, problem = refused(served_api.console_url("ghost"), tokens["operator"])
    assert (status, problem["code"], problem["server"]) == (409, "VmNotRunning", "cs1")


def test_vm_console_in_a_terminal_shows_the_guest_and_ctrl_bracket_leaves(guest, served_api, tokens):
    controller, terminal = os.openpty()
    before = termios.tcgetattr(terminal)
    proc = subprocess.Popen(
        [str(LAXCLUSTER), "--url", served_api.url, "vm", "console", guest.vm],
        cwd=REPO, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
        env={**os.environ, "LAXCLUSTER_TOKEN": tokens["operator"]})
    try:
        seen = Screen(controller)
        wait_until(lambda: b"Ctrl-] leaves" in seen.read(), 30, "vm console to say it is connected")
        # Raw mode: the terminal no longer echoes or edits lines; the guest's shell does.
        assert not termios.tcgetattr(terminal)[3] & termios.ECHO

        def asked() -> re.Match | None:
            os.write(controller, ASK_BOOT_LINE)
            return BOOT_LINE.search(seen.read(wait_s=2))

        assert wait_until(asked, 120, "the boot line through vm console").groups() == (b"con1", b"192.0.2.9")
        os.write(controller, b"\x1d")
        assert proc.wait(15) == 0
        assert termios.tcgetattr(terminal) == before
        assert b"left the console" in seen.read(wait_s=1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        os.close(controller)
        os.close(terminal)


class Screen:
    """Everything written to a pseudo-terminal so far, read without blocking past a short wait."""

    def __init__(self, controller: int) -> None:
        self.controller = controller
        self.text = b""

    def read(self, wait_s: float = 0.2) -> bytes:
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            if ready_to_read([self.controller], [], [], left)[0]:
                self.text += os.read(self.controller, 4096)
        return self.text


def closed(ws: websocket.WebSocket) -> bool:
    ws.settimeout(1)
    try:
        opcode, _ = ws.recv_data()
    except websocket.WebSocketTimeoutException:
        return False
    except websocket.WebSocketConnectionClosedException:
        return True
    return opcode == websocket.ABNF.OPCODE_CLOSE
