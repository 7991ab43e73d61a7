"""A node worker's heartbeat per server it serves: one of the signals the HA watcher (tasks.control.ha)
needs to go silent, beside the server's libvirtd, before it declares the server failed."""

import os
import threading
import time

import redis
from celery.signals import worker_ready

from tasks import runtime
from tasks.queues import node_queue
from tasks.runtime import Runtime


def worker_key(server: str) -> str:
    return f"server:{server}:worker"


def silence_key(server: str) -> str:
    """Since when the HA watcher has heard none of the server's signals (absent while one answers)."""
    return f"server:{server}:silent-since"


def worker_ttl_s(rt: Runtime) -> int:
    return int(rt.config.section("ha").get("worker_ttl_s", 9))


@worker_ready.connect
def beat_for_served_servers(sender, **_: object) -> None:
    """Refresh the heartbeat key of every server whose node queue this worker consumes, until it dies."""
    queues = {queue.name for queue in sender.task_consumer.queues}
    rt = runtime.current()
    served = [server.name for _, _, server in rt.config.servers() if node_queue(server.name) in queues]
    if served:
        threading.Thread(target=_beat, args=(rt, served), name="node-heartbeat", daemon=True).start()


def _beat(rt: Runtime, servers: list[str]) -> None:
    ttl = worker_ttl_s(rt)
    while True:
        for server in servers:
            try:
                rt.redis.set(worker_key(server), os.getpid(), ex=ttl)
            except redis.RedisError:
                pass  # the key lapses, which is true: nobody can hear this worker now
        time.sleep(ttl / 3)
