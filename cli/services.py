"""The embedded service set that `laxcluster run` supervises: Redis, workers, beat, Flower, API.

Each service is a child process leading a session of its own, so Ctrl-C reaches only the launcher,
which then stops them all at once (SIGTERM to every process group, SIGKILL to what is left after one
shared deadline) and leaves none behind. Each is in the launcher's run record from the moment it starts,
and gets SIGTERM should the launcher die without stopping it.
"""

import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cli.procs import dying_with_parent, stop_groups
from cli.runrecord import RunRecord
from config import Config
from errors import InvalidInput
from tasks.queues import all_queues

# SIGTERM's grace, shared by all services: with SIGKILL's wait after it, a stop ends well within 15 s.
STOP_GRACE_S = 10
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# A config file written before `[api] workers` existed gets what the packaged defaults say.
DEFAULT_API_WORKERS = 2


@dataclass
class Service:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=dying_with_parent())

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        """Stop the service and everything it forked (its whole process group)."""
        if self.proc is not None:
            stop_groups([self.proc.pid], STOP_GRACE_S)
            self.proc.poll()


def flower_password(var_dir: Path) -> str:
    """Flower's basic-auth password, generated once into <var_dir>/flower.password (mode 0600)."""
    path = var_dir / "flower.password"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(18))
    return path.read_text().strip()


def redis_service(config: Config) -> Service:
    redis = config.section("redis")
    var = config.var_dir.resolve()
    return Service("redis", ["redis-server", *redis_auth_file(var, redis.get("password", "")),
                             "--bind", redis["host"], "--port", str(redis["port"]),
                             "--pidfile", str(var / "redis.pid"), "--dir", str(var), "--save", "60 1",
                             "--dbfilename", "redis.rdb"], var / "log" / "redis.log")


def redis_auth_file(var: Path, password: str) -> list[str]:
    """redis-server's config file argument carrying `requirepass` (mode 0600, so the password is in no
    process list), or nothing when Redis needs no password."""
    if not password:
        return []
    if any(c in password for c in '"\\\n\r'):
        raise InvalidInput("redis.password must not contain quotes, backslashes or line breaks", field="redis.password")
    path = var / "redis-auth.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(f'requirepass "{password}"\n')
    return [str(path)]


def celery_services(config: Config) -> list[Service]:
    """One worker per queue, beat, and Flower behind basic auth."""
    var = config.var_dir.resolve()
    celery = [sys.executable, "-m", "celery", "-A", "tasks.app"]
    workers = [
        Service(f"worker {queue}", [*celery, "worker", "-Q", queue, "-n", f"{queue}@%h", "-c", "2", "--loglevel", "INFO"],
                var / "log" / f"worker-{queue}.log")
        for queue in all_queues(config)
    ]
    flower = config.section("flower")
    return [
        *workers,
        Service("beat", [*celery, "beat", "-s", str(var / "celerybeat-schedule"), "--loglevel", "INFO"], var / "log" / "beat.log"),
        Service("flower", [*celery, "flower", f"--address={flower['host']}", f"--port={flower['port']}",
                           f"--basic-auth={flower['user']}:{flower_password(var)}"], var / "log" / "flower.log"),
    ]


def api_service(config: Config) -> Service:
    api = config.section("api")
    return Service("api", api_argv(api["host"], api["port"], workers=int(api.get("workers", DEFAULT_API_WORKERS))),
                   config.var_dir.resolve() / "log" / "api.log")


def api_argv(host: str, port: int, *, workers: int, threads: int = 16) -> list[str]:
    """The command serving the API: `workers` processes of gunicorn's threaded worker, which hands websocket
    routes (the console) their socket.

    Console sessions are long-lived, so a stop waits only a few seconds for them.
    """
    return [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", str(workers), "--threads", str(threads),
            "--bind", f"{host}:{port}", "--graceful-timeout", "5", "--no-control-socket",
            "--config", "python:config.gunicorn_settings", "api:create_app()"]


class StopRequested(KeyboardInterrupt):
    """A stop signal interrupted the start (a KeyboardInterrupt, so no `except Exception` swallows it)."""


class Supervisor:
    """Starts services, recording each in `record` if given, and stops them all on a stop signal or when one dies.

    The first SIGINT, SIGTERM or SIGHUP interrupts a start in progress (StopRequested) or ends `watch`;
    any further one only makes a stop under way skip the rest of its grace and SIGKILL at once, so no
    signal can cut a stop short and leave services behind.
    """

    def __init__(self, env: dict[str, str], record: RunRecord | None = None) -> None:
        self.env = env
        self.record = record
        self.running: list[Service] = []
        self.stop_signal: str | None = None
        self.interruptible = True
        self.stopping = False
        self.hurry = False

    def handle_signals(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def start(self, service: Service) -> None:
        # Not interrupted between Popen and the record: a child started but not recorded would be left behind.
        self.interruptible = False
        try:
            service.start(self.env)
            self.running.append(service)
            if self.record:
                self.record.add(service.name, service.proc.pid, service.argv)
        finally:
            self.interruptible = True
        if self.stop_signal:
            raise StopRequested(f"{self.stop_signal} received")

    def watch(self, poll_s: float = 0.5) -> str:
        """Block until a stop signal arrives or a service exits; return why."""
        self.interruptible = False
        while not self.stop_signal:
            for service in self.running:
                code = service.exited()
                if code is not None:
                    return f"{service.name} exited with {code} (see {service.log})"
            time.sleep(poll_s)
        return f"{self.stop_signal} received"

    def stop_all(self) -> set[int]:
        """Stop every service and whatever it forked, all at once, within STOP_GRACE_S and SIGKILL's wait.

        Returns the process groups still alive even after SIGKILL (normally none).
        """
        self.stopping = True
        stuck = stop_groups([service.proc.pid for service in self.running], STOP_GRACE_S, lambda: self.hurry)
        for service in self.running:
            service.exited()  # reaps it
        self.running = [service for service in self.running if service.proc.pid in stuck]
        return stuck

    def _on_signal(self, sig: int, _frame: object) -> None:
        if self.stopping or self.stop_signal:
            # A further signal: the stop, under way or about to begin, SIGKILLs at once instead of waiting.
            self.hurry = True
            return
        self.stop_signal = signal.Signals(sig).name
        if self.interruptible:
            raise StopRequested(f"{self.stop_signal} received")
