"""A throwaway database and role on the machine's PostgreSQL 15 cluster, for tests and benchmarks.

The cluster is started if it is down and stopped again afterwards unless another user's throwaway
database (tests or benchmarks running meanwhile) is still there.
"""

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

VERSION, CLUSTER = "15", "main"
PREFIX = "lxtest_"


class PostgresMissing(RuntimeError):
    """PostgreSQL 15 is not installed here."""


@dataclass(frozen=True)
class Postgres:
    url: str


def installed() -> bool:
    return shutil.which("pg_ctlcluster") is not None and Path(f"/etc/postgresql/{VERSION}/{CLUSTER}").exists()


@contextmanager
def throwaway_database() -> Iterator[Postgres]:
    """A new database owned by a new role (both dropped at the end), the cluster started if need be."""
    if not installed():
        raise PostgresMissing(f"PostgreSQL {VERSION} is not installed (apt package postgresql; make setup installs it)")
    status = subprocess.run(["pg_ctlcluster", VERSION, CLUSTER, "status"], capture_output=True)
    started = status.returncode != 0
    if started:
        subprocess.run(["pg_ctlcluster", VERSION, CLUSTER, "start"], check=True)
    suffix = secrets.token_hex(4)
    role = database = PREFIX + suffix
    password = secrets.token_hex(12)
    psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    psql(f"CREATE DATABASE {database} OWNER {role}")
    try:
        yield Postgres(f"postgresql+psycopg://{role}:{password}@127.0.0.1:5432/{database}")
    finally:
        psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        psql(f"DROP ROLE IF EXISTS {role}")
        if started and not _other_databases():
            subprocess.run(["pg_ctlcluster", VERSION, CLUSTER, "stop"], check=False)


def psql(statement: str) -> str:
    """Run one statement as the postgres superuser; its output."""
    # Names and passwords come from hex digits generated here, never from outside input.
    return subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
                           "-c", statement], check=True, capture_output=True, text=True).stdout


def _other_databases() -> bool:
    return bool(psql(f"SELECT datname FROM pg_database WHERE datname LIKE '{PREFIX}%'").strip())
