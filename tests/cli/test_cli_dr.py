"""`laxcluster dr` against the API served for real: enable submits the first ship, status lists each replicated
VM with its RPO against the target, the DR actions are jobs, and a refusal is the API's code on stderr."""

import json
from datetime import timedelta

from click.testing import CliRunner
from sqlalchemy import select

from cli.main import cli
from models import Job, utcnow
from models.db import transaction
from models.protection import ReplicaPoint, Replication
from tests.fixtures import factories


def invoke(api_url, token, *args):
    return CliRunner().invoke(cli, ["--url", api_url, "--token", token, *args], catch_exceptions=False)


def ok(result):
    assert result.exit_code == 0, result.output
    return result.stdout


def submitted(rt) -> list[tuple[str, dict]]:
    with rt.sessions() as session:
        return [(job.kind, job.params) for job in session.scalars(select(Job).order_by(Job.created_at))]


def test_dr_commands(rt, api_url, tokens):
    with transaction(rt.sessions) as session:
        factories.vm(session, "web", template_row=factories.template(session), state="running", disk_bytes=1 << 30)
    operator = tokens["operator"]
    ok(invoke(api_url, operator, "dr", "enable", "web", "--rpo", "30", "--bandwidth", "10M", "--keep", "4"))
    with transaction(rt.sessions) as session:
        rep = session.scalar(select(Replication))
        assert (rep.rpo_target_s, rep.bandwidth_limit_bytes_s, rep.keep, rep.mode) == (30, 10 << 20, 4, "continuous")
        session.add(ReplicaPoint(replication_id=rep.id, name="rep-1", san_id=rep.peer_san_id,
                                 taken_at=utcnow() - timedelta(seconds=90)))
    listed = json.loads(ok(invoke(api_url, tokens["viewer"], "dr", "status", "--json")))
    assert [(r["vm"], r["state"], r["newest_point"], r["peer_san"]) for r in listed] == [("web", "alert", "rep-1", "san-b")]
    table = ok(invoke(api_url, tokens["viewer"], "dr", "status"))
    assert "alert" in table and "san-b" in table
    ok(invoke(api_url, operator, "dr", "failover", "web", "--unplanned", "--point", "rep-1"))
    ok(invoke(api_url, operator, "dr", "drill", "web", "--server", "cs3"))
    assert submitted(rt) == [("replicate-to-dr", {"vm": "web"}),
                             ("failover", {"vm": "web", "planned": False, "point": "rep-1"}),
                             ("drill", {"vm": "web", "server": "cs3"})]
    twice = invoke(api_url, operator, "dr", "enable", "web")
    assert twice.exit_code == 1 and twice.stderr.startswith("ReplicationExists")
    bad = invoke(api_url, operator, "dr", "enable", "web", "--schedule", "sometimes")
    assert bad.exit_code == 1 and bad.stderr.startswith("InvalidInput")
