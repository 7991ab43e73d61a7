"""Job kinds are declared once: submission validates their typed parameters and derives the queue,
the lock target and the audit record; nothing else names a queue."""

from pathlib import Path

import pytest
from sqlalchemy import select

from errors import InvalidInput, UnknownKind, VmNotFound
from models import AuditEvent
from models.db import transaction
from tasks import submission
from tasks.inventory.config_sync import sync_from_config
from tasks.kinds import KINDS, Migrate, parse, stored
from tests.fixtures import factories

TESTER = submission.Requester("tester", "192.0.2.7")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def inventory(rt):
    with transaction(rt.sessions) as session:
        sync_from_config(session, rt.config)
        factories.vm(session, "web", server="cs2", disk_bytes=1 << 30)
    return rt


def submitted(rt, kind: str, params: dict, **options):
    with transaction(rt.sessions) as session:
        job, created = submission.submit(session, kind, params, TESTER, **options)
        return job.id, job.kind, job.queue, job.target, dict(job.params), created


@pytest.mark.parametrize(("kind", "params", "queue", "target"), [
    ("install-vm", {"vm": "web", "disk_bytes": 1 << 30, "server": None}, "control", "vm/web"),
    ("snapshot-backup", {"vm": "web", "mode": "diff", "store": "local"}, "san.site-a", "backup/web"),
    ("refresh-san", {"san": "san-b"}, "san.site-b", "san/san-b"),
    ("power-domain", {"vm": "web", "server": "cs2", "action": "shutdown"}, "node.cs2", "domain/web"),
    ("migrate-domain", {"vm": "web", "source": "cs2", "destination": "cs1"}, "node.cs2", "domain/web"),
])
def test_a_kind_derives_its_queue_and_lock_and_keeps_the_parameters_as_given(inventory, kind, params, queue, target):
    _, got_kind, got_queue, got_target, got_params, created = submitted(inventory, kind, params)
    assert (got_kind, got_queue, got_target, got_params, created) == (kind, queue, target, params, True)


def test_a_top_level_job_is_audited_with_who_asked_and_from_where(inventory):
    job_id, *_ = submitted(inventory, "delete-vm", {"vm": "web"})
    submitted(inventory, "remove-domain", {"vm": "web", "server": "cs2"}, parent_id=job_id, step="s#0")
    with inventory.sessions() as session:
        events = session.scalars(select(AuditEvent)).all()
    assert [(e.actor, e.action, e.target, e.source_ip, e.details["job_id"]) for e in events] == [
        ("tester", "vm.delete", "vm/web", "192.0.2.7", job_id)]


@pytest.mark.parametrize(("kind", "params", "field"), [
    ("migrate", {"vm": "web", "bandwidth_mib_s": "fast"}, "bandwidth_mib_s"),
    ("migrate", {"vm": "web", "speed": 3}, "speed"),
    ("snapshot-backup", {"vm": "web", "mode": "sometimes"}, "mode"),
    ("start", {}, "vm"),
])
def test_wrong_parameters_are_refused_at_submission_naming_the_field(inventory, kind, params, field):
    with pytest.raises(InvalidInput) as refused:
        submitted(inventory, kind, params)
    assert (refused.value.http_status, refused.value.extra["field"]) == (422, field)


def test_an_unknown_kind_or_a_missing_vm_is_refused(inventory):
    with pytest.raises(UnknownKind):
        submitted(inventory, "reticulate-splines", {})
    with pytest.raises(VmNotFound):
        submitted(inventory, "prepare-vm-disks", {"vm": "nope", "disk_bytes": 1})


def test_workflows_read_typed_parameters_with_their_defaults():
    params = parse(KINDS["migrate"], {"vm": "web"})
    assert isinstance(params, Migrate) and (params.live, params.check, params.to) == (True, False, None)
    assert stored(params) == {"vm": "web"}


def test_only_tasks_names_queues():
    named = [str(path.relative_to(REPO)) for folder in ("api", "cli") for path in (REPO / folder).rglob("*.py")
             if any(word in path.read_text() for word in ("san_queue", "node_queue", "CONTROL"))]
    assert named == []
