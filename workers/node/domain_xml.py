"""How a VM becomes libvirt domain XML, for QEMU without acceleration, KVM and Xen.

Disks are iSCSI LUNs reached through QEMU's own iSCSI client (libvirt network disks with
cache='none', so live migration with shared storage is safe); the NoCloud seed is an
extra read-only disk. The SAN host itself, running a VM for maintenance, opens the volumes
by path instead (LocalDisk). Xen's libxl takes no iSCSI network disks: there a LUN is the block
device the server's own open-iscsi session gives it (`iscsi_by_path`), which the server must
have logged in to before the domain starts. Values only ever reach the XML as element text or attribute values
through ElementTree, which escapes them.
"""

import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from errors import InvalidInput

Hypervisor = Literal["qemu", "kvm", "xen"]
HYPERVISORS = ("qemu", "kvm", "xen")
NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class IscsiDisk:
    """A LUN on an iSCSI target, logged into as `initiator_iqn` (the name the target's ACL allows)."""

    target_iqn: str
    lun: int
    host: str
    port: int = 3260
    initiator_iqn: str | None = None
    readonly: bool = False


@dataclass(frozen=True)
class FileDisk:
    """An image file on the cluster server itself (used for small NoCloud seeds)."""

    path: Path
    readonly: bool = True


@dataclass(frozen=True)
class LocalDisk:
    """A volume on the host that runs the domain, by path: the SAN host running a VM for maintenance opens
    its volumes directly. `lun` is the LUN the volume has when exported; it names the device, as on a server."""

    path: Path
    lun: int
    readonly: bool = False


Disk = IscsiDisk | LocalDisk


@dataclass(frozen=True)
class Nic:
    """A network card; with neither `network` nor `bridge`, QEMU's user-mode network (no host setup needed)."""

    mac: str
    network: str | None = None
    bridge: str | None = None


@dataclass(frozen=True)
class Vnc:
    """A VNC display on `listen` (the server's management address), its port chosen by libvirt, behind `password`."""

    listen: str
    password: str


@dataclass(frozen=True)
class DirectBoot:
    """Boot a kernel (and initrd) found on the cluster server instead of the disk's boot loader."""

    kernel: Path
    initrd: Path | None
    cmdline: str


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    memory_bytes: int
    vcpus: int
    hypervisor: Hypervisor
    disks: tuple[Disk, ...]
    seed: Disk | FileDisk | None = None
    # Data disks after the boot disk and seed; each one's device follows its LUN (see data_dev), so adding or
    # removing one never renames another.
    data: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = field(default_factory=tuple)
    boot: DirectBoot | None = None
    description: str | None = None
    vnc: Vnc | None = None


def domain_xml(spec: DomainSpec) -> str:
    """The libvirt domain XML for `spec`; raises InvalidInput for values libvirt would refuse."""
    validate(spec)
    domain = ET.Element("domain", type=spec.hypervisor)
    ET.SubElement(domain, "name").text = spec.name
    ET.SubElement(domain, "uuid").text = str(uuidlib.UUID(spec.uuid))
    if spec.description:
        ET.SubElement(domain, "description").text = spec.description
    kib = str(-(-spec.memory_bytes // 1024))
    ET.SubElement(domain, "memory", unit="KiB").text = kib
    ET.SubElement(domain, "currentMemory", unit="KiB").text = kib
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    add_os(domain, spec)
    if spec.hypervisor != "xen":
        features = ET.SubElement(domain, "features")
        ET.SubElement(features, "acpi")
        ET.SubElement(features, "apic")
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    ET.SubElement(domain, "on_crash").text = "destroy"
    add_devices(domain, spec)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def validate(spec: DomainSpec) -> None:
    if spec.hypervisor not in HYPERVISORS:
        raise InvalidInput(f"hypervisor {spec.hypervisor!r} is not one of {', '.join(HYPERVISORS)}", field="hypervisor")
    if not NAME.fullmatch(spec.name):
        raise InvalidInput(f"domain name {spec.name!r} is not [a-z0-9-]", field="name")
    try:
        uuidlib.UUID(spec.uuid)
    except ValueError as exc:
        raise InvalidInput(f"bad uuid {spec.uuid!r}", field="uuid") from exc
    if spec.memory_bytes < 1024 * 1024:
        raise InvalidInput(f"memory {spec.memory_bytes} bytes is below 1 MiB", field="memory_bytes")
    if spec.vcpus < 1:
        raise InvalidInput(f"vcpus must be at least 1, not {spec.vcpus}", field="vcpus")
    if spec.vnc is not None and not 1 <= len(spec.vnc.password) <= 8:
        raise InvalidInput("a VNC password has 1 to 8 characters", field="vnc_password")
    for nic in spec.nics:
        if not MAC.fullmatch(nic.mac.lower()):
            raise InvalidInput(f"MAC address {nic.mac!r} is not of the form 52:54:00:12:34:56", field="mac")
        if nic.network and nic.bridge:
            raise InvalidInput("a NIC joins a network or a bridge, not both", field="nics")
        if spec.hypervisor == "xen" and not (nic.network or nic.bridge):
            raise InvalidInput("Xen has no user-mode network: give the NIC a network or bridge", field="nics")


def add_os(domain: ET.Element, spec: DomainSpec) -> None:
    if spec.hypervisor == "xen" and spec.boot is None:
        # The schema wants the boot loader before <os>.
        ET.SubElement(domain, "bootloader").text = "pygrub"
    os_el = ET.SubElement(domain, "os")
    if spec.hypervisor == "xen":
        # Paravirtual, as the classic Xen clusters ran: no firmware, kernel from the host or pygrub.
        ET.SubElement(os_el, "type", arch="x86_64", machine="xenpv").text = "xen"
    else:
        ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    if spec.boot is not None:
        ET.SubElement(os_el, "kernel").text = str(spec.boot.kernel)
        if spec.boot.initrd is not None:
            ET.SubElement(os_el, "initrd").text = str(spec.boot.initrd)
        ET.SubElement(os_el, "cmdline").text = spec.boot.cmdline
    elif spec.hypervisor != "xen":
        ET.SubElement(os_el, "boot", dev="hd")


def add_devices(domain: ET.Element, spec: DomainSpec) -> None:
    devices = ET.SubElement(domain, "devices")
    disks: list[Disk | FileDisk] = [*spec.disks, *([spec.seed] if spec.seed is not None else [])]
    for index, disk in enumerate(disks):
        add_disk(devices, disk, target_dev(spec.hypervisor, index), spec.hypervisor)
    for disk in spec.data:
        add_disk(devices, disk, data_dev(spec.hypervisor, disk), spec.hypervisor)
    for nic in spec.nics:
        add_nic(devices, nic, spec.hypervisor)
    if spec.vnc is not None:
        add_vnc(devices, spec.vnc)
    if spec.hypervisor == "xen":
        console = ET.SubElement(devices, "console", type="pty")
        ET.SubElement(console, "target", type="xen", port="0")
    else:
        serial = ET.SubElement(devices, "serial", type="pty")
        ET.SubElement(serial, "target", port="0")
        console = ET.SubElement(devices, "console", type="pty")
        ET.SubElement(console, "target", type="serial", port="0")


def add_vnc(devices: ET.Element, vnc: Vnc) -> None:
    graphics = ET.SubElement(devices, "graphics", type="vnc", port="-1", autoport="yes", passwd=vnc.password)
    ET.SubElement(graphics, "listen", type="address", address=vnc.listen)
    video = ET.SubElement(devices, "video")
    ET.SubElement(video, "model", type="vga")


def target_dev(hypervisor: Hypervisor, index: int) -> str:
    """vda, vdb, … (xvda, … on Xen); past z: vdaa, vdab, … as the guest kernel names them."""
    prefix = "xvd" if hypervisor == "xen" else "vd"
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return prefix + letters


def data_dev(hypervisor: Hypervisor, disk: Disk) -> str:
    """A data disk's device name from its LUN (LUN 1 is the boot disk's vda, LUN 2 the seed's vdb, LUN 3 vdc, …)."""
    return target_dev(hypervisor, disk.lun - 1)


def data_disk_xml(disk: IscsiDisk, hypervisor: Hypervisor) -> str:
    """The `<disk>` element of one data disk, as libvirt's attachDeviceFlags and detachDeviceFlags take it."""
    devices = ET.Element("devices")
    add_disk(devices, disk, data_dev(hypervisor, disk), hypervisor)
    return ET.tostring(devices[0], encoding="unicode")


def iscsi_by_path(disk: IscsiDisk) -> str:
    """The block device open-iscsi's udev rules name for `disk` once the server is logged in to its target."""
    return f"/dev/disk/by-path/ip-{disk.host}:{disk.port}-iscsi-{disk.target_iqn}-lun-{disk.lun}"


def add_disk(devices: ET.Element, disk: Disk | FileDisk, dev: str, hypervisor: Hypervisor) -> None:
    if isinstance(disk, IscsiDisk) and hypervisor == "xen":
        el = ET.SubElement(devices, "disk", type="block", device="disk")
        ET.SubElement(el, "driver", name="phy")
        ET.SubElement(el, "source", dev=iscsi_by_path(disk))
    elif isinstance(disk, IscsiDisk):
        el = ET.SubElement(devices, "disk", type="network", device="disk")
        ET.SubElement(el, "driver", name="qemu", type="raw", cache="none")
        source = ET.SubElement(el, "source", protocol="iscsi", name=f"{disk.target_iqn}/{disk.lun}")
        ET.SubElement(source, "host", name=disk.host, port=str(disk.port))
        if disk.initiator_iqn is not None:
            initiator = ET.SubElement(source, "initiator")
            ET.SubElement(initiator, "iqn", name=disk.initiator_iqn)
    else:
        block = isinstance(disk, LocalDisk) and disk.path.is_relative_to("/dev")
        el = ET.SubElement(devices, "disk", type="block" if block else "file", device="disk")
        ET.SubElement(el, "driver", name="qemu", type="raw")
        ET.SubElement(el, "source", **{"dev" if block else "file": str(disk.path)})
    ET.SubElement(el, "target", dev=dev, bus="xen" if hypervisor == "xen" else "virtio")
    if disk.readonly:
        ET.SubElement(el, "readonly")


def add_nic(devices: ET.Element, nic: Nic, hypervisor: Hypervisor) -> None:
    if nic.network:
        el = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(el, "mac", address=nic.mac.lower())
        ET.SubElement(el, "source", network=nic.network)
    elif nic.bridge:
        el = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(el, "mac", address=nic.mac.lower())
        ET.SubElement(el, "source", bridge=nic.bridge)
    else:
        el = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(el, "mac", address=nic.mac.lower())
    if hypervisor != "xen":
        ET.SubElement(el, "model", type="virtio")
