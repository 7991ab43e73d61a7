"""HA on the lab: cs1's libvirtd and node worker are killed -9 while its QEMUs run on (a real split brain).
The watcher declares cs1 failed, fences it at the SAN, restarts the VMs that want it on cs2; the old guest on
cs1 (reached through its serial pty) cannot get a write to its disk; `server activate` removes its definition."""

import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import select

from lab import cluster as lab_cluster
from lab.processes import alive, qemu_of, read_pidfile, stop, wait_until
from lab.topology import lab_dir
from models import SUCCEEDED, AuditEvent, ClusterServer, Job, VirtualMachine
from tasks.faults import KILL_AT
from tasks.queues import CONTROL, node_queue, san_queue
from tasks.runtime import Runtime
from tests.fixtures.check import assert_clean, run_check
from tests.fixtures.faults import record
from tests.fixtures.guest import (
    Pty,
    on_disk,
    read_probe,
    serial_pty,
    sync_command,
    write_and_sync,
)
from tests.fixtures.lab_vms import prepare_inventory, remove_domains_of_this_test
from tests.fixtures.vms import (
    boot_line,
    install,
    libvirt_state,
    run_job,
    server_uri,
    unique,
    vm_uuid,
)

pytestmark = [pytest.mark.integration, pytest.mark.lab]
FAILED_AFTER_S = 6
RECOVERY_DEADLINE_S = 240


MAIN_QUEUES = [CONTROL, san_queue("site-a"), san_queue("site-b"), node_queue("cs2"), node_queue("cs3")]


@dataclass
class HaLab:
    rt: Runtime
    env: dict[str, str]
    start_worker: Any
    main: Any = None
    cs1: Any = None
    baseline: list[dict[str, Any]] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)

    def start_main(self, crash_at: str | None = None) -> None:
        """The worker for control, the SANs, cs2 and cs3, with beat; killing itself at `crash_at` if given."""
        if crash_at:
            self.env[KILL_AT] = crash_at
        try:
            self.main = self.start_worker(MAIN_QUEUES, beat=True, concurrency=4)
        finally:
            self.env.pop(KILL_AT, None)

    def start_cs1(self) -> None:
        self.cs1 = self.start_worker([node_queue("cs1")], concurrency=2)

    def fail_cs1(self, *vms: str) -> float:
        """Kill -9 cs1's libvirtd and node worker; its QEMUs run on (remembered, to be killed at the end)."""
        self.orphans.extend(pid for vm in vms for pid in qemu_of(vm))
        os.kill(read_pidfile(lab_dir(self.rt.config) / "cs1" / "pids" / "libvirtd.pid"), signal.SIGKILL)
        self.cs1.kill()
        return time.monotonic()

    def recovered(self) -> Job:
        return wait_until(lambda: _final(recovery_of(self.rt, "cs1")), RECOVERY_DEADLINE_S, "the recovery of cs1 to end")

    def bring_back_cs1(self, celery_app) -> Job:
        """cs1's libvirtd and worker up again, and cs1 re-admitted."""
        lab_cluster.up(self.rt.config)
        self.start_cs1()
        return run_job(self.rt, celery_app, "activate-server", {"server": "cs1"})


@pytest.fixture
def ha_lab(rt, celery_app, celery_worker, lax_env, tiny) -> Iterator[HaLab]:
    """HA switched on (fast timings); one worker for control, the SANs, cs2 and cs3 (with beat), another
    for cs1 alone, so cs1's node worker can die by itself."""
    lax_env.update(LAXCLUSTER_HA_ENABLED="true", LAXCLUSTER_HA_FAILED_AFTER_S=str(FAILED_AFTER_S),
                   LAXCLUSTER_HA_CHECK_EVERY_S="2", LAXCLUSTER_HA_WORKER_TTL_S="3")
    lab = HaLab(rt, lax_env, celery_worker)
    lab.start_main()
    lab.start_cs1()
    prepare_inventory(rt, celery_app, tiny)
    run_check(rt, celery_app, repair=True)
    lab.baseline = run_check(rt, celery_app)["drifts"]
    try:
        yield lab
    finally:
        # QEMUs whose libvirtd died are known to no libvirtd that could stop them.
        stop([pid for pid in lab.orphans if alive(pid)], first=signal.SIGKILL)
        lab_cluster.up(rt.config)  # cs1's libvirtd again, whatever happened
        remove_domains_of_this_test(rt)


def recovery_of(rt, server: str) -> Job | None:
    with rt.sessions() as session:
        return session.scalar(select(Job).where(Job.kind == "recover-server", Job.target == f"recover/{server}"))


def server_of(rt, name: str) -> str:
    with rt.sessions() as session:
        return session.scalar(select(ClusterServer.name).join(VirtualMachine, VirtualMachine.server_id == ClusterServer.id)
                              .where(VirtualMachine.name == name))


@pytest.mark.postgres_too
def test_a_failed_server_is_fenced_and_its_vms_restart_elsewhere(ha_lab: HaLab, celery_app):
    lab, rt = ha_lab, ha_lab.rt
    kept, opted_out = unique("ha"), unique("hano")
    assert install(rt, celery_app, kept, server="cs1").state == SUCCEEDED
    assert install(rt, celery_app, opted_out, server="cs1", ha=False).state == SUCCEEDED
    cs1, cs2 = server_uri(rt, "cs1"), server_uri(rt, "cs2")
    assert boot_line(cs1, kept)[0] == kept
    before = f"before-{secrets.token_hex(6)}"
    assert write_and_sync(cs1, kept, before, timeout=60) and on_disk(rt, kept, before)

    # cs1's management plane dies; its QEMUs do not.
    old_qemu = qemu_of(kept)
    killed_at = lab.fail_cs1(kept, opted_out)
    recovery = lab.recovered()
    took = time.monotonic() - killed_at
    assert recovery.state == SUCCEEDED, recovery.error_message
    assert recovery.result["restarted"] == {kept: "cs2"} and recovery.result["opted_out"] == [opted_out]
    assert recovery.result["signals"] == {"node worker": False, "libvirtd": False}
    assert recovery.result["sessions_dropped"] >= 2, "the SAN saw cs1's QEMUs still logged in: a split brain"
    assert took >= FAILED_AFTER_S
    assert len(old_qemu) == 1 and alive(old_qemu[0]), "the old QEMU on cs1 must still run"
    assert (server_of(rt, kept), server_of(rt, opted_out)) == ("cs2", "cs1")
    with rt.sessions() as session:
        decided = dict(session.execute(select(AuditEvent.target, AuditEvent.action).where(AuditEvent.actor == "ha")).all())
    assert decided == {"recover/cs1": "server.recover", f"vm/{kept}": "vm.ha-restart"}

    # The new instance on cs2 has what was written before; it writes on.
    assert boot_line(cs2, kept)[0] == kept
    assert read_probe(cs2, kept) == before
    after = f"after-{secrets.token_hex(6)}"
    assert write_and_sync(cs2, kept, after, timeout=60) and on_disk(rt, kept, after)

    # The old guest still runs on cs1, known to no libvirtd: through its serial pty it answers, but a write
    # from it never reaches its disk.
    pty = Pty(serial_pty(lab_dir(rt.config) / "cs1" / "log" / "qemu" / f"{kept}.log"))
    try:
        assert pty.ask("echo alive-$((6*7))", "alive-42", timeout=30), "the old guest's shell must answer"
        split = f"split-{secrets.token_hex(6)}"
        assert not pty.ask(*sync_command(split), timeout=20)
    finally:
        pty.close()
    assert alive(old_qemu[0]) and not on_disk(rt, kept, split)
    assert read_probe(cs2, kept) == after

    # cs1 comes back (libvirtd, then its worker) and is re-admitted: the stale definition goes.
    activated = lab.bring_back_cs1(celery_app)
    assert activated.state == SUCCEEDED, activated.error_message
    assert activated.result["undefined"] == [vm_uuid(rt, kept)]
    assert libvirt_state(cs1, kept) is None
    for name in (kept, opted_out):
        assert run_job(rt, celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED
    assert_clean(rt, celery_app, lab.baseline)
    print(f"failure -> recovery ended: {took:.1f} s (failed_after_s {FAILED_AFTER_S})")


@pytest.mark.faults
@pytest.mark.parametrize("phase", ["plan", "restart"])
def test_a_recovery_survives_a_crash_of_the_control_worker(ha_lab: HaLab, celery_app, fault_table, phase: str):
    lab, rt, name = ha_lab, ha_lab.rt, unique("hacr")
    assert install(rt, celery_app, name, server="cs1").state == SUCCEEDED
    lab.main.stop()
    lab.start_main(crash_at=f"recover-server/{phase}")
    lab.fail_cs1(name)
    wait_until(lambda: lab.main.proc.poll() is not None, RECOVERY_DEADLINE_S, f"the worker to die at recover-server/{phase}")
    restarted_at = time.monotonic()
    lab.start_main()
    recovery = lab.recovered()
    assert recovery.state == SUCCEEDED, recovery.error_message
    assert recovery.result["restarted"] == {name: "cs2"}
    assert boot_line(server_uri(rt, "cs2"), name)[0] == name
    assert lab.bring_back_cs1(celery_app).state == SUCCEEDED
    assert run_job(rt, celery_app, "delete-vm", {"vm": name}).state == SUCCEEDED
    assert_clean(rt, celery_app, lab.baseline)
    record(fault_table, f"control worker killed -9 at recover-server / {phase} (cs1 failed)",
           f"recover-server: {recovery.state}", round(time.monotonic() - restarted_at, 1),
           f"re-run; {name} boots on cs2; cs1 re-admitted; check clean")


def _final(job: Job | None) -> Job | None:
    return job if job is not None and job.is_final else None
