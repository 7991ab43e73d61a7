"""Helpers for lab tests of VMs: run a job to its end, install a VM, read its boot line."""

import re
import secrets

from lab.processes import wait_until
from models import Job
from models.db import transaction
from tasks import jobs
from tasks.dispatch import dispatch
from tasks.queues import CONTROL
from tasks.inventory.vms import InstallRequest, reserve_vm
from workers.node.console import ConsoleTimeout, SerialConsole, start_event_loop
from workers.node.host import connect

BOOT_LINE = r"LAXCLUSTER-BOOT hostname=(\S+) ip=(\S+)"


def run_job(rt, celery_app, kind, target, queue, params, timeout=180) -> Job:
    with transaction(rt.sessions) as session:
        job, _ = jobs.submit(session, kind=kind, target=target, queue=queue, params=params)
    dispatch(celery_app, job)
    return wait_job(rt, job.id, timeout)


def wait_job(rt, job_id: str, timeout: float = 180) -> Job:
    """The job once it has reached a final state (fails the test after `timeout` seconds)."""
    def ended():
        with rt.sessions() as session:
            current = session.get(Job, job_id)
            return current if current.is_final else None

    return wait_until(ended, timeout, f"job {job_id} to end")


def unique(name: str) -> str:
    """A VM name no earlier test on the shared lab has used (domains and volumes outlive a test's DB)."""
    return f"{name}-{secrets.token_hex(3)}"


def install(rt, celery_app, name, memory=256 << 20, **extra) -> Job:
    with transaction(rt.sessions) as session:
        reserve_vm(session, rt.config, InstallRequest(name=name, template="tiny", memory_bytes=memory, vcpus=1,
                                                      disk_bytes=128 << 20, subnet="lan", **extra))
    params = {"vm": name, "disk_bytes": 128 << 20, "server": extra.get("server")}
    return run_job(rt, celery_app, "install-vm", f"vm/{name}", CONTROL, params)


def boot_line(uri: str, name: str) -> tuple[str, str]:
    """Ask the guest's console shell for the boot line until the guest has printed it."""
    start_event_loop()
    conn = connect(uri)
    try:
        with SerialConsole(conn.lookupByName(name)) as console:
            def asked() -> re.Match | None:
                console.write(b"cat /etc/laxcluster-boot\n")
                try:
                    return console.read_until(BOOT_LINE, timeout=3)
                except ConsoleTimeout:
                    return None

            return wait_until(asked, 120, f"the boot line on {name}'s console").groups()
    finally:
        conn.close()


def server_uri(rt, name):
    return next(s.uri for _, _, s in rt.config.servers() if s.name == name)


