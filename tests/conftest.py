"""Shared fixtures: a real Redis, a real DB (SQLite and PostgreSQL), real Celery workers; and, from
tests/fixtures, the API (app, client, tokens), the API served for real, and VMs on the lab."""

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import config
from lab.postgres import Postgres, throwaway_database
from lab.postgres import installed as postgres_installed
from lab.processes import free_port, wait_until
from models.db import migrate
from tasks.runtime import Runtime, make_runtime
from tests.support import REPO, missing, need_binary, need_root

pytest_plugins = ["tests.fixtures.api", "tests.fixtures.served", "tests.fixtures.lab_vms", "tests.fixtures.check",
                  "tests.fixtures.faults"]
TEST_JOB_SETTINGS = {
    "LAXCLUSTER_JOBS_HEARTBEAT_TTL_S": "3",
    "LAXCLUSTER_JOBS_RECONCILE_EVERY_S": "2",
    "LAXCLUSTER_JOBS_DB_WRITE_INTERVAL_S": "0.2",
    "LAXCLUSTER_JOBS_RETRY_DELETE_EVERY_S": "3",
}


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server of our own on a free loopback port, stopped by PID at the end."""
    need_binary("redis-server")
    port, workdir = free_port(), tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        wait_until(lambda: _pings(client), 10, "redis-server to answer")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(client) -> bool:
    import redis

    try:
        return client.ping()
    except redis.ConnectionError:
        return False


@pytest.fixture
def tgtd(tmp_path: Path):
    """A tgtd of our own on 127.0.0.1 (free port, own control port), stopped even if the test fails."""
    from tests.fixtures.san import TgtDaemon

    need_root()
    need_binary("tgtd", "tgtadm")
    daemon = TgtDaemon(tmp_path / "tgtd.log")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """PostgreSQL 15 (started with pg_ctlcluster if it is down) and a throwaway database and role."""
    if not postgres_installed():
        missing("PostgreSQL 15 is not installed (apt package postgresql; make setup installs it)")
    with throwaway_database() as database:
        yield database


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Model and job tests run on SQLite and PostgreSQL; lab tests (slow, driving daemons) on SQLite, and
    those marked `postgres_too` (one end to end per workflow kind) on PostgreSQL as well."""
    chosen = any("db_url" in str(mark.args[0]) for mark in metafunc.definition.iter_markers("parametrize"))
    if "db_url" in metafunc.fixturenames and not chosen:
        sqlite_only = metafunc.definition.get_closest_marker("lab") and not metafunc.definition.get_closest_marker("postgres_too")
        metafunc.parametrize("db_url", ["sqlite"] if sqlite_only else ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A freshly migrated inventory DB: a SQLite file, or PostgreSQL (a new schema each test)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'inventory.db'}"
        migrate(url)
        yield url
        return
    url = request.getfixturevalue("fresh_postgres_url")
    migrate(url)
    yield url


@pytest.fixture
def fresh_postgres_url(postgres: Postgres) -> str:
    """The session's PostgreSQL database, emptied: no tables, not migrated."""
    _reset_schema(postgres.url)
    return postgres.url


def _reset_schema(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(scope="session")
def lab_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The config file of a whole lab (namespaces, libvirtds, tgtds, pools) shared by the session's tests."""
    from lab.testing import make_test_config, running_lab

    need_root()
    need_binary("libvirtd", "tgtd", "mkfs.xfs", "qemu-system-x86_64", "ip", "dnsmasq", "dhcp_release")
    path = make_test_config(tmp_path_factory.mktemp("lab"))
    with running_lab(path):
        yield path


@pytest.fixture
def lax_env(request: pytest.FixtureRequest, db_url: str, redis_port: int, tmp_path: Path) -> dict[str, str]:
    """LAXCLUSTER_* variables pointing a process at this test's DB and Redis (own Redis db index per test);
    tests marked `lab` also get the lab's config file."""
    if request.node.get_closest_marker("lab"):
        place = {"LAXCLUSTER_CONFIG": str(request.getfixturevalue("lab_config"))}
    else:
        place = {"LAXCLUSTER_VAR_DIR": str(tmp_path / "var")}
    return {
        **place,
        "LAXCLUSTER_DB_URL": db_url,
        "LAXCLUSTER_REDIS_PORT": str(redis_port),
        "LAXCLUSTER_REDIS_DB": str(int.from_bytes(os.urandom(1), "big") % 15 + 1),
        **TEST_JOB_SETTINGS,
    }


@pytest.fixture
def rt(lax_env: dict[str, str]) -> Iterator[Runtime]:
    """A Runtime (config, DB sessions, Redis) like the API and workers build, for this test."""
    runtime = make_runtime(config.load(environ=lax_env))
    runtime.redis.flushdb()
    yield runtime
    runtime.redis.flushdb()
    runtime.redis.close()
    runtime.engine.dispose()


@pytest.fixture
def celery_app(rt: Runtime):
    """A Celery app talking to this test's broker, for sending work like the API does."""
    from tasks.app import make_celery

    app = make_celery(rt.config)
    yield app
    app.close()


@dataclass
class Worker:
    """A real `celery worker` subprocess in its own process group."""

    proc: subprocess.Popen
    log: Path
    queues: list[str] = field(default_factory=list)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"celery worker exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return " ready." in self.log.read_text()

    def kill(self) -> None:
        """SIGKILL the worker and its pool children, as a crash would."""
        _signal_group(self.proc, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def celery_worker(lax_env: dict[str, str], tmp_path: Path):
    """Factory: start a real Celery worker on `queues` (optionally with embedded beat); all stopped at the end."""
    started: list[Worker] = []

    def start(queues: list[str], *, beat: bool = False, concurrency: int = 2) -> Worker:
        index = len(started)
        log = tmp_path / f"worker-{index}.log"
        argv = [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-Q", ",".join(queues),
                "-n", f"test{index}-{secrets.token_hex(3)}@%h", "-c", str(concurrency), "--loglevel", "INFO",
                "--logfile", str(log)]
        if beat:
            argv += ["-B", "-s", str(tmp_path / f"beat-{index}.schedule")]
        env = {**os.environ, **lax_env}
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        worker = Worker(proc, log, queues)
        started.append(worker)
        log.touch()
        wait_until(worker.ready, 60, f"celery worker on {queues} to be ready")
        return worker

    yield start
    for worker in started:
        worker.stop()
