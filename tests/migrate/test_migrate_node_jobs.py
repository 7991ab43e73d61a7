"""The hypervisor side of a migration runs on the source server's node queue, never in the control worker:
the libvirt pre-flight (`preflight-migration`) and the settle (`settle-domain`), against libvirt's test driver."""

from pathlib import Path

from sqlalchemy import select, update

from models import FAILED, SUCCEEDED, ClusterServer, Job, VirtualMachine
from models.db import transaction
from tasks.queues import CONTROL, node_queue
from tests.fixtures import factories
from tests.fixtures.vms import run_job
from tests.support import TEST_DRIVER_UUID

# test:///default is one shared fake hypervisor per process, with a running domain named "test".
SHARED = "test:///default"


def servers(rt, **uris: str) -> None:
    with transaction(rt.sessions) as session:
        for name, uri in uris.items():
            session.execute(update(ClusterServer).where(ClusterServer.name == name).values(libvirt_uri=uri))


def test_migrate_check_gets_libvirts_problems_from_a_child_on_the_source_servers_queue(app, rt, celery_app, celery_worker):
    servers(rt, cs1=SHARED, cs2=SHARED)
    with transaction(rt.sessions) as session:
        session.execute(update(ClusterServer).where(ClusterServer.name == "cs2").values(maintenance=True))
        factories.vm(session, "test", server="cs1", state="running", uuid=TEST_DRIVER_UUID)
    celery_worker([CONTROL, node_queue("cs1")])
    job = run_job(rt, celery_app, "migrate", {"vm": "test", "to": "cs2", "check": True}, timeout=60)
    assert job.state == SUCCEEDED, job.error_message
    problems = {p["code"]: p["message"] for p in job.result["problems"]}
    assert {"ServerInMaintenance", "NotEnoughMemory", "DomainExists"} <= set(problems), problems
    assert problems["DomainExists"] == (f"cs2 already has a domain of test (UUID {TEST_DRIVER_UUID}): "
                                        "remove the stale definition there first")
    assert "needs 256 MiB" in problems["NotEnoughMemory"] and job.result["can_migrate"] is False
    with rt.sessions() as session:
        child = session.scalar(select(Job).where(Job.parent_id == job.id))
    assert (child.kind, child.target, child.queue, child.state) == ("preflight-migration", "preflight/test", "node.cs1",
                                                                    SUCCEEDED)
    assert child.result == {"problems": job.result["problems"]}  # the inventory found nothing, libvirt all of these


def test_settle_domain_keeps_the_vm_where_it_runs_and_records_it(app, rt, celery_app, celery_worker, tmp_path: Path):
    empty = tmp_path / "empty-node.xml"
    empty.write_text("<node/>")
    servers(rt, cs1=SHARED, cs2=f"test://{empty}")
    with transaction(rt.sessions) as session:
        factories.vm(session, "test", server="cs2", state="unknown", uuid=TEST_DRIVER_UUID)
    celery_worker([node_queue("cs1")])
    job = run_job(rt, celery_app, "settle-domain", {"vm": "test", "source": "cs1", "destination": "cs2"}, timeout=60)
    assert (job.state, job.result) == (SUCCEEDED, {"server": "cs1"}), job.error_message
    with rt.sessions() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == "test"))
        assert (session.get(ClusterServer, vm.server_id).name, vm.state) == ("cs1", "running")


def kinds(rt, **kinds: str | None) -> None:
    with transaction(rt.sessions) as session:
        for name, kind in kinds.items():
            session.execute(update(ClusterServer).where(ClusterServer.name == name).values(hypervisor=kind))


def test_migrate_check_refuses_a_move_between_hypervisor_kinds_from_the_inventory(app, rt, celery_app, celery_worker):
    servers(rt, cs1=SHARED, cs2=SHARED)
    kinds(rt, cs1="kvm", cs2="qemu")
    with transaction(rt.sessions) as session:
        factories.vm(session, "test", server="cs1", state="running", uuid=TEST_DRIVER_UUID, hypervisor="kvm")
    celery_worker([CONTROL])  # no node worker: the inventory alone refuses, libvirt is never asked
    job = run_job(rt, celery_app, "migrate", {"vm": "test", "to": "cs2", "check": True}, timeout=60)
    assert job.state == SUCCEEDED, job.error_message
    assert job.result["problems"] == [{"code": "HypervisorMismatch", "message": (
        "cs2 is a qemu server, test's server cs1 is kvm: a VM moves only between servers of one kind: "
        "choose a kvm server")}]
    assert job.result["can_migrate"] is False
    with rt.sessions() as session:
        assert session.scalar(select(Job).where(Job.parent_id == job.id)) is None


def test_migrate_refuses_a_destination_of_unknown_kind(app, rt, celery_app, celery_worker):
    servers(rt, cs1=SHARED, cs2=SHARED)
    kinds(rt, cs2=None)
    with transaction(rt.sessions) as session:
        factories.vm(session, "test", server="cs1", state="running", uuid=TEST_DRIVER_UUID)
    celery_worker([CONTROL])
    job = run_job(rt, celery_app, "migrate", {"vm": "test", "to": "cs2"}, timeout=60)
    assert (job.state, job.error_code) == (FAILED, "PreflightFailed"), job.error_message
    assert "the hypervisor kind of cs2 is not known yet" in job.error_message


def test_migrate_without_a_destination_only_chooses_a_server_of_the_vms_kind(app, rt, celery_app, celery_worker):
    servers(rt, cs1=SHARED, cs2=SHARED)
    kinds(rt, cs1="kvm", cs2="qemu")  # cs2, the only other server of the cluster, is of another kind
    with transaction(rt.sessions) as session:
        factories.vm(session, "test", server="cs1", state="running", uuid=TEST_DRIVER_UUID, hypervisor="kvm")
    celery_worker([CONTROL])
    job = run_job(rt, celery_app, "migrate", {"vm": "test", "check": True}, timeout=60)
    assert job.state == SUCCEEDED, job.error_message
    assert [p["code"] for p in job.result["problems"]] == ["NoCapacity"]
    assert "no usable server" in job.result["problems"][0]["message"]
