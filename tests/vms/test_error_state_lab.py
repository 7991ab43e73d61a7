"""A VM job that fails with nothing undoing it leaves the VM in state `error`, naming what is left; the
reconciler deletes it again until that works; `vm delete` and `server evacuate` cope with such VMs."""

import os
import signal

import pytest
from sqlalchemy import select

from lab import cluster as lab_cluster
from lab.processes import read_pidfile, wait_until
from lab.topology import lab_dir
from models import FAILED, SUCCEEDED, ClusterServer, Job, VirtualMachine
from tasks.queues import CONTROL
from tests.fixtures.vms import install, run_job, san_objects, server_uri, unique
from workers.node import domains

pytestmark = [pytest.mark.integration, pytest.mark.lab]


def vm_row(rt, name: str) -> VirtualMachine | None:
    with rt.sessions() as session:
        return session.scalar(select(VirtualMachine).where(VirtualMachine.name == name))


@pytest.mark.postgres_too
def test_an_install_whose_undo_fails_is_an_error_vm_deleted_once_it_can_be(cluster, celery_app, celery_worker, api):
    rt = cluster
    name, before = unique("ghost"), san_objects(rt)
    os.kill(read_pidfile(lab_dir(rt.config) / "cs1" / "pids" / "libvirtd.pid"), signal.SIGKILL)
    try:
        job = install(rt, celery_app, name, server="cs1")
        assert (job.state, job.error_code) == (FAILED, "CleanupFailed"), job.error_message
        assert "left behind" in job.error_message and "a domain on cs1" in job.error_message
        vm = vm_row(rt, name)
        assert (vm.state, vm.desired_state) == ("error", "deleted")
        assert f"vm-{vm.uuid}-disk" in job.error_message
        shown = api.get(f"/vms/{name}").get_json()
        assert shown["state"] == "error" and "left behind" in shown["error"]
        celery_worker([CONTROL], beat=True)  # the reconciler, which tries to delete it again
        wait_until(lambda: run_count(rt, name) >= 1, 60, "the reconciler to retry the delete")
        assert vm_row(rt, name) is not None  # libvirtd is still away: the retry cannot finish
    finally:
        lab_cluster.up(rt.config)
    wait_until(lambda: vm_row(rt, name) is None, 120, f"the reconciler to delete {name}")
    assert san_objects(rt) == before


def run_count(rt, name: str) -> int:
    with rt.sessions() as session:
        return len(session.scalars(select(Job.id).where(Job.kind == "delete-vm", Job.target == f"vm/{name}")).all())


def test_delete_and_evacuate_handle_a_vm_without_a_domain(cluster, celery_app):
    rt = cluster
    name, before = unique("nodom"), san_objects(rt)
    assert install(rt, celery_app, name, server="cs2").state == SUCCEEDED
    domains.undefine(server_uri(rt, "cs2"), vm_row(rt, name).uuid)
    wait_until(lambda: vm_row(rt, name).state == "undefined", 30, "the lifecycle event to reach the DB")

    evacuated = run_job(rt, celery_app, "evacuate", {"server": "cs2"})
    assert evacuated.state == SUCCEEDED, evacuated.error_message
    assert evacuated.result["moved"] == {name: "cs1"}
    with rt.sessions() as session:
        assert session.get(ClusterServer, vm_row(rt, name).server_id).name == "cs1"

    deleted = run_job(rt, celery_app, "delete-vm", {"vm": name})
    assert deleted.state == SUCCEEDED, deleted.error_message
    assert vm_row(rt, name) is None and san_objects(rt) == before
