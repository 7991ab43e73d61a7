"""The handles a process needs to run jobs: config, DB session factory, Redis client."""

from dataclasses import dataclass
from functools import cache

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import config as config_module
from config import Config
from models.db import make_engine, make_session_factory


@dataclass(frozen=True)
class Runtime:
    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    redis: redis.Redis


def make_runtime(config: Config) -> Runtime:
    engine = make_engine(config.db_url)
    return Runtime(
        config=config,
        engine=engine,
        sessions=make_session_factory(engine),
        redis=redis.Redis.from_url(config.redis_url, decode_responses=True),
    )


@cache
def current() -> Runtime:
    """The runtime of this process, built once from the configuration (file + environment)."""
    return make_runtime(config_module.load())
