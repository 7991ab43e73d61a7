"""A DR drill's domain, on a server of the DR site (`node.<server>` queue): the VM's replica point booted with
no network at all, under its own name and UUID, so production (the VM, its disks, its network) is never touched."""

import uuid
from dataclasses import replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import ClusterServer, San, Template, VirtualMachine, Volume
from tasks.context import JobContext
from tasks.inventory.specs import vm_spec
from tasks.node.domains import BOOT_TIMEOUT_S, ISCSI_PORT, server_kind, vm_and_server
from tasks.workflow import workflow
from workers.node import domains
from workers.node.domain_xml import IscsiDisk, domain_xml


def drill_uuid(vm: VirtualMachine) -> str:
    """The drill domain's UUID: derived from the VM's, so every run of a drill (and its cleanup) finds the same one."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"laxcluster:drill/{vm.uuid}"))


def drill_xml(session: Session, vm: VirtualMachine, server: ClusterServer, target: str, san: str) -> str:
    """The VM's domain with its disks read from the drill's target on the DR SAN, no NIC, its own name and UUID."""
    host, _, port = session.scalar(select(San.portal).where(San.name == san)).rpartition(":")

    def drill_disk(volume: Volume) -> IscsiDisk:
        return IscsiDisk(target, volume.iscsi_lun, host, int(port or ISCSI_PORT), server.initiator_iqn)

    spec = vm_spec(session, vm, server_kind(server), drill_disk, ())
    return domain_xml(replace(spec, name=f"drill-{vm.uuid[:8]}", uuid=drill_uuid(vm),
                              description=f"DR drill of {vm.name}"))


@workflow("drill-domain")
def drill_domain(ctx: JobContext) -> dict[str, Any]:
    """Boot the drill domain and watch the guest come up (the template's console probe), then remove it; with
    `end`, only remove it."""
    with ctx.session() as session:
        vm, server = vm_and_server(session, ctx.params.vm, ctx.params.server)
        template = session.get(Template, vm.template_id)
        probe = (template.boot or {}).get("probe") if template else None
        xml = None if ctx.params.end else drill_xml(session, vm, server, ctx.params.target, ctx.params.san)
        uri, domain = server.libvirt_uri, drill_uuid(vm)
    if ctx.params.end:
        domains.undefine(uri, domain)
        return {"removed": domain}
    ctx.phase("define", progress=10)
    domains.define(uri, xml)
    try:
        ctx.phase("boot", progress=20)
        domains.start(uri, domain)
        ctx.phase("watch the guest", progress=30)
        up, detail = domains.came_up(uri, domain, probe, BOOT_TIMEOUT_S)
    finally:
        domains.undefine(uri, domain)
    return {"came_up": up, "detail": detail, "domain": domain}
