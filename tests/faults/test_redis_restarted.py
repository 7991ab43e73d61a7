"""Redis (the broker and the progress bus) is killed -9 and started again empty while one job runs and others
wait in its queue: the running job finishes without being run twice, and none of the queued jobs is lost
(the reconciler sends again what the broker forgot)."""

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from lab.processes import free_port, wait_until
from models import SUCCEEDED
from models.db import transaction
from tasks import jobs
from tasks.dispatch import alive_key, dispatch
from tasks.queues import CONTROL
from tests.fixtures.faults import record
from tests.fixtures.vms import wait_job
from tests.support import need_binary

pytestmark = [pytest.mark.integration, pytest.mark.faults]


class RedisServer:
    """A redis-server of this test's own, which it can kill and start again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir, self.proc = free_port(), workdir, None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        wait_until(lambda: self._pings(client), 10, "redis-server to answer")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return client.ping()
        except redis.ConnectionError:
            return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    need_binary("redis-server")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc.poll() is None:
        server.kill()


@pytest.fixture
def redis_port(own_redis: RedisServer) -> int:
    return own_redis.port


def test_a_redis_restart_loses_no_job(rt, lax_env, celery_worker, celery_app, own_redis, fault_table):
    lax_env["LAXCLUSTER_JOBS_REQUEUE_AFTER_S"] = "3"
    celery_worker([CONTROL], beat=True, concurrency=1)
    with transaction(rt.sessions) as session:
        running, _ = jobs.submit(session, kind="noop", target="noop/long", queue=CONTROL,
                                 params={"seconds": 8, "steps": 8})
        queued = [jobs.submit(session, kind="noop", target=f"noop/{n}", queue=CONTROL, params={"seconds": 0.1})[0]
                  for n in range(5)]
    for job in [running, *queued]:
        dispatch(celery_app, job)
    wait_until(lambda: rt.redis.get(alive_key(running.id)) == "running", 30, "the long job to run")

    own_redis.kill()
    own_redis.start()
    back = time.monotonic()

    ended = [wait_job(rt, job.id, 60) for job in [running, *queued]]
    seconds = round(time.monotonic() - back, 1)
    assert [job.state for job in ended] == [SUCCEEDED] * 6, [(j.state, j.error_message) for j in ended]
    assert ended[0].result["attempt"] == 1  # carried on through the restart, not run again
    database = rt.config.db_url.split(":")[0].split("+")[0]
    record(fault_table, f"Redis killed -9 and restarted empty: 1 job running, 5 queued ({database})",
           "noop x6: succeeded", seconds, "running job not re-run; queued jobs sent again by the reconciler")
