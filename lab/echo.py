"""A stream of small packets to a guest's echo service (busybox `nc -ll -p PORT -e /bin/cat`, started on its
serial console) over the VM network, from the root namespace: each line awaited before the next, so the
time between two replies is how long the connection was stuck (tests of the VM network, bench/migrate.py)."""

import socket
import threading
import time

from lab.processes import wait_until

ECHO_PORT = 7000
# The shell's answer differs from the echoed command line (`$((1+1))`), so seeing it means it ran.
START_ECHO = f"nc -ll -p {ECHO_PORT} -e /bin/cat & echo ECHO-STARTED-$((1+1))"
ECHO_STARTED = r"ECHO-STARTED-2"


def connect_to(ip: str, timeout: float = 60) -> socket.socket:
    """A TCP connection to the guest's echo service, once it accepts one."""
    def attempt() -> socket.socket | None:
        try:
            return socket.create_connection((ip, ECHO_PORT), timeout=2)
        except OSError:
            return None

    sock = wait_until(attempt, timeout, f"the echo service at {ip}:{ECHO_PORT}", interval=0.5)
    sock.settimeout(60)
    return sock


def echo(sock: socket.socket, data: bytes) -> bytes:
    """Send `data` and return as many bytes as came back."""
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(len(data) - len(received))
        if not chunk:
            raise ConnectionError(f"the guest closed the connection after {received!r}")
        received += chunk
    return received


class EchoStream(threading.Thread):
    """Numbered lines, each awaited before the next; `times` holds when each reply came (monotonic)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(name="echo-stream", daemon=True)
        self.sock = sock
        self.times: list[float] = [time.monotonic()]
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    @property
    def replies(self) -> int:
        return len(self.times) - 1

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                line = b"%08d\n" % self.replies
                got = echo(self.sock, line)
                if got != line:
                    raise AssertionError(f"sent {line!r}, the guest sent back {got!r}")
                self.times.append(time.monotonic())
        except BaseException as error:  # the caller asserts there was none
            self.error = error

    def more_replies(self, count: int, what: str, timeout: float = 60) -> None:
        """Return once `count` more replies came; raise the stream's error if it broke."""
        target = self.replies + count
        wait_until(lambda: self.replies >= target or self.error is not None, timeout, what)
        if self.error is not None:
            raise self.error

    def longest_gap(self, start: float = 0.0, end: float = float("inf")) -> float:
        """The longest wait for a reply (seconds) among waits that overlap [start, end] (monotonic)."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:]) if b >= start and a <= end]
        return max(gaps, default=0.0)

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)
