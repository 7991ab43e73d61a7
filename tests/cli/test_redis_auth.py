"""A Redis that asks for a password: the launcher starts it with one kept out of the process list, and
every client built from the configuration (runtime, Celery, the launcher's probe) authenticates."""

import os

import pytest
import redis

import config
from cli.services import redis_service
from lab.processes import free_port, wait_until
from tasks.app import make_celery
from tasks.runtime import make_runtime
from tests.support import need_binary

PASSWORD = "s3cret pass:word/@"


def answers(url: str) -> bool:
    try:
        return redis.Redis.from_url(url).ping()
    except redis.ConnectionError:
        return False


def test_a_redis_with_a_password_is_started_and_reached_through_the_configuration(tmp_path):
    need_binary("redis-server")
    port = free_port()
    cfg = config.load(environ={"LAXCLUSTER_VAR_DIR": str(tmp_path / "var"), "LAXCLUSTER_REDIS_PORT": str(port),
                               "LAXCLUSTER_REDIS_PASSWORD": PASSWORD})
    service = redis_service(cfg)
    assert not any(PASSWORD in arg for arg in service.argv)
    assert (tmp_path / "var" / "redis-auth.conf").stat().st_mode & 0o777 == 0o600
    service.start(dict(os.environ))
    try:
        wait_until(lambda: answers(cfg.redis_url), 15, "redis to answer with the password")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        runtime = make_runtime(cfg)
        assert runtime.redis.ping()
        runtime.engine.dispose()
        celery = make_celery(cfg)
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            connection.default_channel.client.set("laxcluster:auth-test", 1)
        celery.close()
        assert redis.Redis.from_url(cfg.redis_url).get("laxcluster:auth-test") == b"1"
    finally:
        service.stop()
