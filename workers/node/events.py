"""Domain lifecycle events of one server, delivered to a callback (reconnecting if libvirtd restarts)."""

import logging
import threading
from collections.abc import Callable

import libvirt

from errors import LaxError
from workers.node.console import start_event_loop
from workers.node.host import connect

log = logging.getLogger(__name__)
RECONNECT_S = 5.0

OnChange = Callable[[str], None]


class LifecycleWatcher:
    """Calls `on_change(domain_uuid)` whenever a domain of `uri` starts, stops, crashes, or is (un)defined."""

    def __init__(self, uri: str, on_change: OnChange) -> None:
        self.uri = uri
        self.on_change = on_change
        self._closed = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lifecycle-{uri}", daemon=True)

    def start(self) -> "LifecycleWatcher":
        start_event_loop()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._closed.set()
        self._thread.join(RECONNECT_S * 2)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                conn = connect(self.uri)
            except LaxError as error:
                log.warning("lifecycle events of %s unavailable: %s", self.uri, error.message)
                self._stopped.wait(RECONNECT_S)
                continue
            self._closed.clear()
            conn.registerCloseCallback(lambda *_: self._closed.set(), None)
            callback = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)
            self._closed.wait()
            self._close(conn, callback)
            self._stopped.wait(RECONNECT_S)

    def _event(self, _conn, domain, _event, _detail, _opaque) -> None:
        try:
            self.on_change(domain.UUIDString())
        except Exception:
            log.exception("handling a lifecycle event of %s on %s failed", domain.name(), self.uri)

    @staticmethod
    def _close(conn: libvirt.virConnect, callback: int) -> None:
        try:
            conn.domainEventDeregisterAny(callback)
            conn.close()
        except libvirt.libvirtError:
            pass
