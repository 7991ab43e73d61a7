"""A VM's libvirt definition from the inventory, wherever it runs: on a cluster server over iSCSI, or on its
SAN host (maintenance) from local paths. The caller says how a volume is reached and which NICs it gets."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Template, VirtualMachine, Volume
from tasks.inventory.vms import DATA_ROLE
from workers.node.domain_xml import DirectBoot, Disk, DomainSpec, Hypervisor, Nic


def vm_spec(session: Session, vm: VirtualMachine, hypervisor: Hypervisor, disk_of: Callable[[Volume], Disk],
            nics: tuple[Nic, ...]) -> DomainSpec:
    """The VM's domain: its boot disk, seed and exported data disks (each as `disk_of` reaches it), `nics`,
    and its template's direct kernel boot if it has one."""
    rows = session.scalars(select(Volume).where(Volume.vm_id == vm.id).order_by(Volume.iscsi_lun)).all()
    volumes = {v.role: v for v in rows if v.role != DATA_ROLE}
    template = session.get(Template, vm.template_id) if vm.template_id else None
    boot = template.boot if template and template.boot else None
    return DomainSpec(
        name=vm.name, uuid=vm.uuid, memory_bytes=vm.memory_bytes, vcpus=vm.vcpus, hypervisor=hypervisor,
        disks=(disk_of(volumes["disk"]),),
        seed=disk_of(volumes["seed"]) if "seed" in volumes else None,
        data=tuple(disk_of(v) for v in rows if v.role == DATA_ROLE and v.iscsi_lun is not None),
        nics=nics,
        boot=direct_boot(boot) if boot else None,
    )


def direct_boot(boot: dict[str, Any], extra_cmdline: str = "") -> DirectBoot:
    """A template's `boot` record as libvirt's direct kernel boot, its command line extended by `extra_cmdline`."""
    cmdline = f"{boot['cmdline']} {extra_cmdline}".strip()
    return DirectBoot(Path(boot["kernel"]), Path(boot["initrd"]) if boot.get("initrd") else None, cmdline)
