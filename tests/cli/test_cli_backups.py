"""`laxcluster backup|store|policy` against the API served for real (waitress)."""

import json

from click.testing import CliRunner
from sqlalchemy import select

from cli.main import cli
from models import Job
from models.db import transaction
from models.protection import Backup, BackupStore
from tests.fixtures import factories

MIB = 1 << 20


def invoke(api_url, token, *args):
    return CliRunner().invoke(cli, ["--url", api_url, "--token", token, *args], catch_exceptions=False)


def ok(result):
    assert result.exit_code == 0, result.output
    return result.stdout


def test_store_and_policy_commands(api_url, tokens):
    made = ok(invoke(api_url, tokens["admin"], "store", "create", "local", "--location", "/srv/backups"))
    assert made.strip() == "store local: local /srv/backups"
    assert "/srv/backups" in ok(invoke(api_url, tokens["viewer"], "store", "list"))

    operator = tokens["operator"]
    created = ok(invoke(api_url, operator, "policy", "create", "nightly", "--vm", "web", "--schedule", "0 3 * * *",
                        "--mode", "diff", "--full-schedule", "0 3 * * 0", "--store", "local", "--keep-last", "3",
                        "--keep-weekly", "4"))
    assert created.strip() == "policy nightly: diff at '0 3 * * *' to local"
    edited = ok(invoke(api_url, operator, "policy", "edit", "nightly", "--schedule", "15 2 * * *", "--disabled"))
    assert "15 2 * * *" in edited
    listed = json.loads(ok(invoke(api_url, operator, "policy", "list", "--json")))
    assert [(p["name"], p["schedule"], p["enabled"], p["retention"]["keep_last"], p["retention"]["weekly"])
            for p in listed] == [("nightly", "15 2 * * *", False, 3, 4)]
    bad = invoke(api_url, operator, "policy", "create", "weekly", "--vm", "web", "--schedule", "sometimes",
                 "--store", "local")
    assert bad.exit_code == 1 and bad.stderr.startswith("InvalidInput: schedule")
    assert invoke(api_url, operator, "policy", "edit", "nightly").exit_code == 2


def test_backup_commands_submit_jobs_and_list_backups(rt, api_url, tokens):
    with transaction(rt.sessions) as session:
        factories.vm(session, "web", state="running", disk_bytes=64 * MIB)
        session.add(BackupStore(name="local", kind="local", location="/srv/backups", credentials={}))
        session.flush()
        store_id = session.scalar(select(BackupStore.id))
        session.add(Backup(id="0b7c5b0e-0000-4000-8000-00000000aaaa", vm_name="web", volume_name="web-disk",
                           san_name="san-a", store_id=store_id, mode="full", state="complete",
                           size_bytes=64 * MIB, bytes_read=12 * MIB, stored_bytes=5 * MIB, chunks=16))
    operator = tokens["operator"]

    submitted = ok(invoke(api_url, operator, "backup", "create", "web", "--diff", "--store", "local"))
    assert "snapshot-backup backup/web" in submitted
    listed = ok(invoke(api_url, operator, "backup", "list", "web"))
    assert "0b7c5b0e-0000-4000-8000-00000000aaaa" in listed and "12.0 MiB" in listed and "64.0 MiB" in listed
    restored = ok(invoke(api_url, operator, "backup", "restore", "0b7c5b0e-0000-4000-8000-00000000aaaa",
                         "--to-volume", "web-copy"))
    assert "restore restore/web-copy" in restored
    ok(invoke(api_url, operator, "backup", "verify", "0b7c5b0e-0000-4000-8000-00000000aaaa"))
    for exclusive in (["--as", "y", "--in-place"], ["--as", "y", "--to-volume", "z"]):
        assert invoke(api_url, operator, "backup", "restore", "x", *exclusive).exit_code == 2
    with rt.sessions() as session:
        kinds = sorted(session.scalars(select(Job.kind)))
    assert kinds == ["restore", "snapshot-backup", "verify-backup"]
    with rt.sessions() as session:
        job = session.scalar(select(Job).where(Job.kind == "snapshot-backup"))
    assert job.params == {"vm": "web", "mode": "diff", "store": "local"}
