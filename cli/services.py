"""The embedded service set that `laxcluster run` supervises: Redis, workers, beat, Flower, API.

Each service is a child process in its own session, so Ctrl-C reaches only the launcher, which
then stops them in reverse order (SIGTERM, SIGKILL after a deadline) and leaves none behind.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from config import Config
from errors import InvalidInput
from tasks.queues import all_queues

STOP_DEADLINE_S = 20


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
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        """Stop the service and everything it forked (its whole process group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        # Pool children of a Celery worker may outlive their parent for a moment.
        _signal_group(self.proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


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
    return Service("api", api_argv(api["host"], api["port"]), config.var_dir.resolve() / "log" / "api.log")


def api_argv(host: str, port: int, threads: int = 16) -> list[str]:
    """The command serving the API: gunicorn's threaded worker, which hands websocket routes (the console) their socket.

    Console sessions are long-lived, so a stop waits only a few seconds for them.
    """
    return [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--threads", str(threads),
            "--bind", f"{host}:{port}", "--graceful-timeout", "5", "--no-control-socket", "api:create_app()"]


class Supervisor:
    """Starts services in order and stops them all, in reverse, on a signal or when one dies."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.running: list[Service] = []
        self.stopping = False

    def start(self, service: Service) -> None:
        service.start(self.env)
        self.running.append(service)

    def watch(self, poll_s: float = 0.5) -> str:
        """Block until a stop signal arrives or a service exits; return why."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        while not self.stopping:
            for service in self.running:
                code = service.exited()
                if code is not None:
                    return f"{service.name} exited with {code} (see {service.log})"
            time.sleep(poll_s)
        return "stop requested"

    def stop_all(self) -> None:
        for service in reversed(self.running):
            service.stop()
        self.running.clear()

    def _on_signal(self, _sig: int, _frame: object) -> None:
        self.stopping = True
