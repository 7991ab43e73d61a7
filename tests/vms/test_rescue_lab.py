"""`vm rescue` on the lab: a stopped VM boots the rescue system (tiny's kernel and initramfs) with its own disk
attached, an operator mounts it on the console, reads and edits a file, the VM neither starts nor shows drift
meanwhile; the rescue ends and the VM boots its own system with the edit in place."""

import secrets

import pytest
from sqlalchemy import select

from models import FAILED, SUCCEEDED, VirtualMachine
from tests.fixtures.check import assert_clean
from tests.fixtures.guest import PROBE_FILE, read_probe, write_and_sync
from tests.fixtures.vms import boot_line, console_answer, install, run_job, server_uri, unique

pytestmark = [pytest.mark.integration, pytest.mark.lab]


def vm_row(rt, name: str) -> VirtualMachine:
    with rt.sessions() as session:
        return session.scalar(select(VirtualMachine).where(VirtualMachine.name == name))


@pytest.mark.postgres_too
def test_a_rescued_vms_disk_is_edited_on_the_console_and_the_vm_boots_with_the_edit(checked_cluster, celery_app,
                                                                                     drift_baseline):
    rt, name = checked_cluster, unique("rescue")
    assert install(rt, celery_app, name, server="cs1").state == SUCCEEDED
    cs1 = server_uri(rt, "cs1")
    assert boot_line(cs1, name)[0] == name
    before, after = f"before-{secrets.token_hex(6)}", f"after-{secrets.token_hex(6)}"
    assert write_and_sync(cs1, name, before, timeout=60)
    assert run_job(rt, celery_app, "destroy", {"vm": name}).state == SUCCEEDED

    rescued = run_job(rt, celery_app, "rescue", {"vm": name})
    assert rescued.state == SUCCEEDED, rescued.error_message
    row = vm_row(rt, name)
    assert (row.state, row.desired_state, rescued.result["server"]) == ("rescue", "stopped", "cs1")
    # The rescue system, not the VM's own: its kernel command line says so, and nothing is mounted.
    console_answer(cs1, name, 'echo RES""CUED-$(grep -c laxcluster.rescue /proc/cmdline)', "RESCUED-1")
    console_answer(cs1, name, 'mkdir -p /mnt; mount -t ext4 /dev/vda /mnt 2>/dev/null; echo PRO""BE-$(cat /mnt' +
                   f'{PROBE_FILE})', f"PROBE-{before}")
    console_answer(cs1, name, f'echo {after} > /mnt{PROBE_FILE} && sync && echo EDI""TED-$(cat /mnt{PROBE_FILE})',
                   f"EDITED-{after}")
    console_answer(cs1, name, 'umount /mnt 2>/dev/null; grep -c " /mnt " /proc/mounts | sed s/^/MOUN""TED-/',
                   "MOUNTED-0")

    refused = run_job(rt, celery_app, "start", {"vm": name})
    assert (refused.state, refused.error_code) == (FAILED, "VmInRescue")
    assert vm_row(rt, name).state == "rescue"
    assert_clean(rt, celery_app, drift_baseline)

    ended = run_job(rt, celery_app, "rescue", {"vm": name, "end": True})
    assert ended.state == SUCCEEDED, ended.error_message
    assert vm_row(rt, name).state == "shut off"
    assert run_job(rt, celery_app, "start", {"vm": name}).state == SUCCEEDED
    assert boot_line(cs1, name)[0] == name
    assert read_probe(cs1, name) == after
    assert_clean(rt, celery_app, drift_baseline)
    assert run_job(rt, celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED
