"""`laxcluster audit` against the API served for real (waitress)."""

import json

import pytest
from click.testing import CliRunner

from cli.main import cli

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_audit_prints_the_newest_changes_as_a_table_and_pages(api_url, tokens):
    admin = ("--url", api_url, "--token", tokens["admin"])
    for n, name in enumerate(("cli-audit-a", "cli-audit-b")):
        made = run(*admin, "subnet", "create", name, "--cidr", f"10.6{n}.0.0/24", "--range", f"10.6{n}.0.10-10.6{n}.0.20")
        assert made.exit_code == 0, made.output
    table = run(*admin, "audit", "--limit", "1")
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if "subnet.create" in line)
    assert "subnet/cli-audit-b" in row and "test-admin" in row and "127.0.0.1" in row
    assert "cli-audit-a" not in table.stdout
    older = table.stderr.strip().split()[-1]
    rest = json.loads(run(*admin, "audit", "--before", older, "--json").stdout)
    assert [event["target"] for event in rest] == ["subnet/cli-audit-a"]
    refused = run("--url", api_url, "--token", tokens["operator"], "audit")
    assert refused.exit_code == 1 and refused.stderr.startswith("Forbidden: ")
