"""`laxcluster db upgrade`: what compose's `migrate` service runs before anything else starts."""

from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import create_engine, select

from cli.main import cli
from models import ClusterServer

DOCKER_CONFIG = Path(__file__).resolve().parents[2] / "docker" / "laxcluster.toml"


def test_db_upgrade_migrates_and_adds_the_configs_servers_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'inventory.db'}"
    env = {"LAXCLUSTER_CONFIG": str(DOCKER_CONFIG), "LAXCLUSTER_DB_URL": url}
    for _ in range(2):  # a second run (a restarted deployment) changes nothing
        result = CliRunner().invoke(cli, ["db", "upgrade"], env=env)
        assert result.exit_code == 0, result.output
        assert "is up to date with" in result.output
    engine = create_engine(url)
    with engine.connect() as db:
        assert sorted(db.scalars(select(ClusterServer.name))) == ["server1", "server2"]
    engine.dispose()
