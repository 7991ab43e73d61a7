"""A domain's serial console through a libvirt stream, so it works on remote servers too.

libvirt's client only moves stream data while an event loop runs: call start_event_loop()
once per process *before* opening the connection the console is read through.
"""

import re
import threading
import time
from types import TracebackType

import libvirt

from errors import ConsoleClosed, ConsoleTimeout

POLL_INTERVAL = 0.05
CHUNK = 4096
# How much of the console's past output an error message and `text` keep.
KEEP = 64 * 1024


_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per process).

    Connections opened afterwards deliver stream data and domain events; ones opened
    before do not.
    """
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run_forever() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _loop_thread = threading.Thread(target=run_forever, name="libvirt-events", daemon=True)
        _loop_thread.start()


class SerialConsole:
    """The serial console of a running (or paused) domain, read and written as bytes.

    Only output produced after opening is seen: to catch a boot message, start the domain
    paused (VIR_DOMAIN_START_PAUSED), open its console, then resume it.
    """

    def __init__(self, domain: libvirt.virDomain) -> None:
        self.stream = domain.connect().newStream(libvirt.VIR_STREAM_NONBLOCK)
        # FORCE takes the console over from a session someone left open.
        domain.openConsole(None, self.stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        # Output read but not yet consumed by a match.
        self.text = ""
        self.closed = False

    def read_available(self) -> bool:
        """Append whatever output is waiting to `text`; False once the console has closed."""
        while not self.closed:
            data = self.stream.recv(CHUNK)
            if data == -2:
                return True
            if not data:
                self.closed = True
                break
            self.text = (self.text + data.decode(errors="replace"))[-KEEP:]
        return False

    def read_until(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Read until `pattern` matches the output not yet consumed; return the match.

        Output up to the end of the match is consumed, so the next call only sees what
        followed it. Raises ConsoleTimeout after `timeout` seconds, ConsoleClosed if the
        console ends first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            open_ = self.read_available()
            match = regex.search(self.text)
            if match:
                self.text = self.text[match.end():]
                return match
            if not open_:
                raise ConsoleClosed(f"console closed before {regex.pattern!r} appeared", tail=self.text[-2000:])
            if time.monotonic() > deadline:
                raise ConsoleTimeout(
                    f"no {regex.pattern!r} on the console within {timeout:g}s; it last showed: {self.text[-300:]!r}",
                    tail=self.text[-2000:],
                )
            time.sleep(POLL_INTERVAL)

    def write(self, data: bytes) -> None:
        """Send `data` to the console (keystrokes for the guest's shell)."""
        sent = 0
        while sent < len(data):
            n = self.stream.send(data[sent:])
            if n == -2:
                time.sleep(POLL_INTERVAL)
                continue
            sent += n

    def close(self) -> None:
        try:
            self.stream.abort()
        except libvirt.libvirtError:
            pass  # the domain (and with it the stream) may already be gone

    def __enter__(self) -> "SerialConsole":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def wait_for_console(domain: libvirt.virDomain, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
    """Open the console of `domain`, read until `pattern` matches (see SerialConsole.read_until), close it."""
    with SerialConsole(domain) as console:
        return console.read_until(pattern, timeout)
