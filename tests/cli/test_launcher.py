"""`laxcluster run` leaves no service behind: Ctrl-C stops them all within 15 s (a second Ctrl-C at once),
a second launcher on the same var_dir refuses to start, and a launcher killed -9 takes its services along,
or else the next start stops what it left first. On an empty PostgreSQL database it migrates it and serves.

Real launchers (`--no-lab`, a config without sites) on free ports with var_dir in the test's tmp_path;
everything they started is killed by PID at the end, also when a test fails."""

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from cli.procs import live_groups, start_time
from cli.runrecord import RunRecord
from cli.services import STOP_GRACE_S
from lab.processes import alive, free_port, wait_until
from models.access import ApiToken
from models.db import make_engine
from tests.support import REPO, need_binary

STOP_WITHIN_S = 15
START_TIMEOUT_S = 120
LAXCLUSTER = [sys.executable, "-c", "from cli.main import cli; cli()"]


@dataclass(frozen=True)
class Proc:
    pid: int
    started: int

    def running(self) -> bool:
        return alive(self.pid) and start_time(self.pid) == self.started


@dataclass
class Launcher:
    proc: subprocess.Popen
    output: Path
    env: dict[str, str]
    record: RunRecord | None = None
    seen: set[Proc] = field(default_factory=set)

    @property
    def text(self) -> str:
        return self.output.read_text()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.env['LAXCLUSTER_API_PORT']}"

    def wait_running(self) -> None:
        wait_until(self._running, START_TIMEOUT_S, "the launcher to say it is running")
        self.record = RunRecord.load(Path(self.env["LAXCLUSTER_VAR_DIR"]) / "run")
        assert self.record is not None and self.record.launcher.pid == self.proc.pid
        self.processes()

    def processes(self) -> set[Proc]:
        """Every live process of the recorded services' groups (pool children, gunicorn workers too)."""
        groups = {service.pid for service in self.record.services}
        found = {Proc(pid, start_time(pid)) for pid in _pids() if _pgid(pid) in groups}
        self.seen |= {proc for proc in found if proc.started is not None}
        return set(self.seen)

    def service_pid(self, name: str) -> int:
        return next(service.pid for service in self.record.services if service.name == name)

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def _running(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the launcher exited with {self.proc.returncode}:\n{self.text[-3000:]}")
        return "LaxCluster is running." in self.text


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launcher]]:
    """Start `laxcluster run --no-lab` on this test's config (each call another launcher on the same var_dir,
    keyword arguments add to its environment);
    at the end SIGKILL every launcher, every process seen and every recorded group still ours."""
    need_binary("redis-server")
    env = launcher_env(tmp_path)
    started: list[Launcher] = []

    def start(**extra_env: str) -> Launcher:
        output = tmp_path / f"launcher-{len(started)}.out"
        own_env = {**env, **extra_env}
        with output.open("wb") as out:
            proc = subprocess.Popen([*LAXCLUSTER, "run", "--no-lab"], cwd=REPO, env=own_env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started.append(Launcher(proc, output, own_env))
        return started[-1]

    try:
        yield start
    finally:
        for launcher in started:
            _kill_everything_of(launcher)


def _kill_everything_of(launcher: Launcher) -> None:
    launcher.proc.kill()
    launcher.proc.wait(10)
    for proc in launcher.seen:
        if proc.running():
            os.kill(proc.pid, signal.SIGKILL)
    services = launcher.record.services if launcher.record else []
    for group in live_groups([service.pid for service in services if service.group_is_ours()]):
        os.killpg(group, signal.SIGKILL)


def launcher_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a launcher of this test: a config without sites (nothing to reach but loopback),
    var_dir under tmp_path, free ports; our checkout on the path of every service it starts."""
    config = tmp_path / "laxcluster.toml"
    config.write_text(CONFIG)
    env = {key: value for key, value in os.environ.items() if not key.startswith("LAXCLUSTER_")}
    return {**env, "PYTHONPATH": str(REPO), "LAXCLUSTER_CONFIG": str(config),
            "LAXCLUSTER_VAR_DIR": str(tmp_path / "var"), "LAXCLUSTER_REDIS_PORT": str(free_port()),
            "LAXCLUSTER_API_PORT": str(free_port()), "LAXCLUSTER_FLOWER_PORT": str(free_port())}


CONFIG = """
var_dir = "var"
iqn_prefix = "iqn.2026-11.org.laxcluster"
default_subnet = "lab"

[redis]
host = "127.0.0.1"
port = 0
db = 0
password = ""

[db]
url = ""

[api]
host = "127.0.0.1"
port = 0

[flower]
host = "127.0.0.1"
port = 0
user = "admin"

[jobs]
visibility_timeout_s = 43200
heartbeat_ttl_s = 20
reconcile_every_s = 15
max_attempts = 3
requeue_after_s = 300
db_write_interval_s = 1.0

[backups]
dispatch_every_s = 20.0
default_store = "local"

[lab]
prefix = "lx"
"""


def freeze(launcher: Launcher, name: str) -> None:
    """Stop service `name` with SIGSTOP: a hung service, which SIGTERM cannot end (the signal stays pending)."""
    os.kill(launcher.service_pid(name), signal.SIGSTOP)


def running_with_beat_hung(launch: Callable[..., Launcher]) -> tuple[Launcher, set[Proc]]:
    """A running launcher whose beat is frozen, and every process of its services."""
    launcher = launch()
    launcher.wait_running()
    freeze(launcher, "beat")
    return launcher, launcher.processes()


def gone(procs: set[Proc]) -> bool:
    return not any(proc.running() for proc in procs)


def health(launcher: Launcher) -> int:
    return requests.get(f"{launcher.api_url}/health", timeout=10).status_code


def test_ctrl_c_stops_every_service_within_15_s_even_a_hung_one(launch):
    launcher, procs = running_with_beat_hung(launch)
    assert {s.name for s in launcher.record.services} >= {"redis", "worker control", "beat", "flower", "api"}

    launcher.signal(signal.SIGINT)
    wait_until(lambda: launcher.proc.poll() is not None and gone(procs), STOP_WITHIN_S,
               "the launcher and every process of its services to end")
    assert launcher.proc.returncode == 0
    assert "stopping: SIGINT received" in launcher.text and "everything stopped" in launcher.text
    assert not (Path(launcher.env["LAXCLUSTER_VAR_DIR"]) / "run" / "launcher.json").exists()


def test_a_second_ctrl_c_while_stopping_kills_what_is_left_at_once(launch):
    launcher, procs = running_with_beat_hung(launch)

    launcher.signal(signal.SIGINT)
    wait_until(lambda: "stopping: SIGINT received" in launcher.text, 10, "the launcher to start stopping")
    launcher.signal(signal.SIGINT)
    # Well before SIGTERM's grace would end: the second signal skipped it.
    wait_until(lambda: launcher.proc.poll() is not None and gone(procs), STOP_GRACE_S / 2,
               "the launcher and every process of its services to end")
    assert launcher.proc.returncode == 0 and "everything stopped" in launcher.text


def test_a_second_launcher_refuses_to_start_and_leaves_the_first_alone(launch):
    first = launch()
    first.wait_running()
    procs = first.processes()

    second = launch()
    wait_until(lambda: second.proc.poll() is not None, 60, "the second launcher to exit")
    assert second.proc.returncode == 1
    assert f"laxcluster run is already running (pid {first.proc.pid})" in second.text
    assert "starting" not in second.text
    assert all(proc.running() for proc in procs) and first.proc.poll() is None
    assert health(first) == 200
    assert RunRecord.load(Path(first.env["LAXCLUSTER_VAR_DIR"]) / "run") == first.record


def test_a_launcher_killed_with_sigkill_takes_its_services_along(launch):
    launcher = launch()
    launcher.wait_running()
    procs = launcher.processes()

    launcher.signal(signal.SIGKILL)
    launcher.proc.wait(10)
    wait_until(lambda: gone(procs), STOP_WITHIN_S, "the services of a killed launcher to end")


def test_the_next_start_stops_what_a_killed_launcher_left_then_starts(launch):
    first, procs = running_with_beat_hung(launch)
    first.signal(signal.SIGKILL)
    first.proc.wait(10)
    # Every service got SIGTERM as the launcher died; the hung one cannot act on it.
    hung = first.service_pid("beat")
    wait_until(lambda: all(proc.pid == hung for proc in procs if proc.running()), STOP_WITHIN_S,
               "every service but the hung one to end")

    second = launch()
    second.wait_running()
    said = next(line for line in second.text.splitlines() if line.startswith("stopping what launcher"))
    assert said == f"stopping what launcher pid {first.proc.pid} left running: beat"
    assert gone(procs)
    assert health(second) == 200
    assert second.record.launcher.pid == second.proc.pid


def test_a_launcher_on_an_empty_postgresql_database_migrates_it_and_serves(launch, fresh_postgres_url):
    launcher = launch(LAXCLUSTER_DB_URL=fresh_postgres_url)
    launcher.wait_running()

    created = subprocess.run([*LAXCLUSTER, "token", "create", "--role", "admin"], cwd=REPO, env=launcher.env,
                             capture_output=True, text=True, check=True)
    token = created.stdout.strip().splitlines()[-1]
    answer = requests.get(f"{launcher.api_url}/vms", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["active"] == [] and answer.json()["inactive"] == []
    assert _tokens_in(fresh_postgres_url) == 1


def _tokens_in(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(ApiToken)).scalar_one()
    finally:
        engine.dispose()
