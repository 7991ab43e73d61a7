"""The node side of a migration, on the SOURCE server's queue: the libvirt pre-flight checks, the libvirt
migration job and the settle that makes the VM run on exactly one server, whatever happened."""

from dataclasses import replace
from typing import Any

from errors import MigrationAborted, MigrationFailed
from tasks import jobs
from tasks.context import JobContext
from tasks.dispatch import cancel_key
from tasks.node.domains import domain_spec, record_state, vm_and_server
from tasks.workflow import workflow
from workers.node import domains
from workers.node import migrate as driver
from workers.node.domain_xml import domain_xml


@workflow("preflight-migration")
def preflight_migration(ctx: JobContext) -> dict[str, Any]:
    """What this (the source) server's and the destination's libvirt say against the move, beside the room
    placement reported: `problems`, a list of {code, message}, empty when the VM can go. Changes nothing."""
    name = ctx.params.vm
    with ctx.session() as session:
        vm, source = vm_and_server(session, name, ctx.params.source)
        source_uri, uuid = source.libvirt_uri, vm.uuid
    room = driver.Room(ctx.params.free_memory_bytes, ctx.params.free_vcpus,
                       ctx.params.memory_bytes, ctx.params.vcpus)
    problems = driver.preflight(source_uri, ctx.params.destination_uri, name, uuid, dest_name=ctx.params.destination,
                                dest_maintenance=ctx.params.destination_maintenance, room=room)
    return {"problems": [problem.as_dict() for problem in problems]}


def settle_domain(ctx: JobContext) -> None:
    settle_and_record(ctx, ctx.params.vm, ctx.params.source, ctx.params.destination)


@workflow("settle-domain")
def settle_domain_job(ctx: JobContext) -> dict[str, Any]:
    """After a migration, however it ended: make the VM run on exactly one of `source` and `destination`
    and record which (the control workflow's cleanup runs this on the source server's queue)."""
    return {"server": settle_and_record(ctx, ctx.params.vm, ctx.params.source, ctx.params.destination)}


@workflow("migrate-domain", cleanup=settle_domain, rerun_after_crash=False)
def migrate_domain(ctx: JobContext) -> dict[str, Any]:
    """Run the libvirt migration from this (the source) server, reporting its job stats as progress."""
    name = ctx.params.vm
    with ctx.session() as session:
        vm, source = vm_and_server(session, name, ctx.params.source)
        _, dest = vm_and_server(session, name, ctx.params.destination)
        spec = domain_spec(session, vm, dest, ctx.rt.config)
        source_uri, dest_uri, uuid = source.libvirt_uri, dest.libvirt_uri, vm.uuid
    if domains.vnc_display(source_uri, uuid) is None:
        # Started before VMs had a display: adding one on the way would change the guest's hardware.
        spec = replace(spec, vnc=None)
    xml = domain_xml(spec)
    ctx.phase("transfer memory", progress=5)

    def progress(sample: driver.MigrationProgress) -> None:
        ctx.report.update(progress=5 + 0.9 * sample.percent, bytes_done=sample.memory_total - sample.memory_remaining,
                          bytes_total=sample.memory_total,
                          message=f"iteration {sample.iteration}, dirty rate {sample.dirty_rate} pages/s")

    try:
        outcome = driver.migrate(source_uri, dest_uri, uuid, xml, live=ctx.params.live,
                                 on_progress=progress, should_abort=lambda: bool(ctx.rt.redis.exists(cancel_key(ctx.job_id))),
                                 bandwidth_mib_s=ctx.params.bandwidth_mib_s)
    except MigrationAborted:
        raise jobs.JobCancelled(ctx.job_id) from None
    ctx.phase("confirm", progress=96)
    where = settle_and_record(ctx, name, ctx.params.source, ctx.params.destination)
    if where != ctx.params.destination:
        raise MigrationFailed(f"libvirt reported success but {name} runs on {where}", server=where)
    return outcome.as_dict()


def settle_and_record(ctx: JobContext, name: str, source: str, dest: str) -> str:
    """Make `name` run on exactly one of the two servers and record that one (and its state) in the DB."""
    with ctx.session() as session:
        vm, src = vm_and_server(session, name, source)
        _, dst = vm_and_server(session, name, dest)
        uris, uuid = {source: src.libvirt_uri, dest: dst.libvirt_uri}, vm.uuid
    side = driver.settle(uris[source], uris[dest], uuid)
    where = source if side == "source" else dest
    state = domains.domain_state(uris[where], uuid)
    with ctx.session() as session:
        vm, server = vm_and_server(session, name, where)
        if vm is not None:
            vm.server_id = server.id
            record_state(session, vm, state)
    return where
