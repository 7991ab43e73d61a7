"""Domain XML for qemu, kvm and xen: valid against libvirt's schema and accepted by libvirt."""

import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import libvirt
import pytest

from errors import InvalidInput
from tests.support import need_binary
from workers.node.domain_xml import (
    DirectBoot,
    DomainSpec,
    FileDisk,
    Hypervisor,
    IscsiDisk,
    LocalDisk,
    Nic,
    Vnc,
    data_disk_xml,
    domain_xml,
    target_dev,
)

TARGET = "iqn.2025-01.org.laxcluster:san-a.vm-web1"
INITIATOR = "iqn.2025-01.org.laxcluster:cs1"
# The name open-iscsi's udev rules give a LUN of TARGET on the SAN's portal after a login.
BY_PATH = f"/dev/disk/by-path/ip-10.1.0.10:3261-iscsi-{TARGET}-lun-{{lun}}"


def make_spec(hypervisor: Hypervisor, *, kernel_boot: bool = True, seed: FileDisk | IscsiDisk | None = None) -> DomainSpec:
    values: dict[str, object] = {
        "name": f"web1-{hypervisor}",
        "uuid": str(uuid.uuid4()),
        "memory_bytes": 256 * 1024 * 1024,
        "vcpus": 2,
        "hypervisor": hypervisor,
        "disks": (IscsiDisk(TARGET, 1, "10.1.0.10", 3261, INITIATOR), IscsiDisk(TARGET, 2, "10.1.0.10", 3261, INITIATOR)),
        "seed": seed if seed is not None else FileDisk(Path("/var/lib/laxcluster/seeds/web1.img")),
        "nics": (Nic("52:54:00:12:34:56", bridge="br-lan" if hypervisor == "xen" else None),),
        "boot": DirectBoot(Path("/var/lib/laxcluster/tiny/vmlinuz"), Path("/var/lib/laxcluster/tiny/initrd.img"), "console=ttyS0 quiet")
        if kernel_boot
        else None,
        "description": "web server <1> & \"friends\"",
    }
    return DomainSpec(**values)  # type: ignore[arg-type]


# A VM on its SAN host: a reflink volume file, the seed, and a data disk on a block device (an LVM volume).
LOCAL = (LocalDisk(Path("/srv/pool/vm-1-disk"), 1), LocalDisk(Path("/srv/pool/vm-1-seed"), 2),
         LocalDisk(Path("/dev/vg0/vm-1-data"), 4))
DATA = (IscsiDisk(TARGET, 3, "10.1.0.10", 3261, INITIATOR), IscsiDisk(TARGET, 5, "10.1.0.10", 3261, INITIATOR))
VARIANTS = [
    pytest.param(make_spec(h, kernel_boot=b, seed=s), id=f"{h}-{'kernel' if b else 'disk'}-{type(s).__name__ if s else 'fileseed'}")
    for h in ("qemu", "kvm", "xen")
    for b in (True, False)
    for s in (None, IscsiDisk(TARGET, 9, "10.1.0.10", 3261, INITIATOR, readonly=True))
] + [pytest.param(replace(make_spec(h), disks=make_spec(h).disks[:1], data=DATA), id=f"{h}-data-disks")
      for h in ("qemu", "xen")] + [pytest.param(replace(make_spec("qemu"), disks=LOCAL[:1], seed=LOCAL[1], data=LOCAL[2:]),
                                                id="qemu-on-the-san-host")] + [
    pytest.param(replace(make_spec(h), vnc=Vnc("10.1.0.11", "s3cr3t!x")), id=f"{h}-vnc") for h in ("qemu", "kvm")]


@pytest.fixture(scope="module")
def test_conn() -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


@pytest.mark.parametrize("spec", VARIANTS)
def test_every_variant_validates_against_libvirts_schema(spec: DomainSpec, tmp_path: Path) -> None:
    need_binary("virt-xml-validate")
    path = tmp_path / "domain.xml"
    path.write_text(domain_xml(spec))
    result = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + path.read_text()


@pytest.mark.parametrize("spec", VARIANTS)
def test_every_variant_is_accepted_by_libvirt(spec: DomainSpec, test_conn: libvirt.virConnect) -> None:
    dom = test_conn.defineXML(domain_xml(spec))
    try:
        defined = ET.fromstring(dom.XMLDesc(0))
        assert defined.get("type") == spec.hypervisor
        assert defined.findtext("description") == spec.description
        assert defined.findtext("memory") == str(spec.memory_bytes // 1024)
        if spec.hypervisor == "xen":
            devices = [s.get("dev") for s in defined.iterfind("devices/disk[@type='block']/source")]
            luns = [disk.lun for disk in (*spec.disks, *spec.data)]
            assert [d for d in devices if not d.endswith("-lun-9")] == [BY_PATH.format(lun=lun) for lun in luns]
        elif isinstance(spec.disks[0], LocalDisk):
            paths = {source.get("file") or source.get("dev") for source in defined.iterfind("devices/disk/source")}
            assert paths == {str(disk.path) for disk in (*spec.disks, spec.seed, *spec.data)}
        else:
            sources = [s.get("name") for s in defined.iterfind("devices/disk/source[@protocol='iscsi']")]
            assert {f"{TARGET}/{disk.lun}" for disk in (*spec.disks, *spec.data)} <= set(sources)
            assert defined.find("devices/disk/source/initiator/iqn").get("name") == INITIATOR
            assert {d.get("cache") for d in defined.iterfind("devices/disk[@type='network']/driver")} == {"none"}
    finally:
        dom.undefine()


def test_qemu_disks_are_virtio_in_order_with_the_seed_last_and_read_only() -> None:
    root = ET.fromstring(domain_xml(make_spec("qemu")))
    disks = root.findall("devices/disk")
    assert [(d.find("target").get("dev"), d.find("target").get("bus")) for d in disks] == [
        ("vda", "virtio"),
        ("vdb", "virtio"),
        ("vdc", "virtio"),
    ]
    assert disks[-1].find("source").get("file") == "/var/lib/laxcluster/seeds/web1.img"
    assert disks[-1].find("readonly") is not None
    assert root.find("devices/serial/target").get("port") == "0"
    assert root.find("devices/graphics") is None
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet"


def test_xen_passes_luns_as_open_iscsi_block_devices_with_xvd_names_and_a_xen_console() -> None:
    root = ET.fromstring(domain_xml(make_spec("xen", kernel_boot=False, seed=IscsiDisk(TARGET, 9, "10.1.0.10", 3261,
                                                                                        INITIATOR, readonly=True))))
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["xvda", "xvdb", "xvdc"]
    assert {(d.get("type"), d.find("driver").get("name"), d.find("target").get("bus")) for d in disks} == {
        ("block", "phy", "xen")}
    assert [d.find("source").get("dev") for d in disks] == [BY_PATH.format(lun=n) for n in (1, 2, 9)]
    assert root.find(".//initiator") is None and root.find(".//source[@protocol]") is None
    assert disks[-1].find("readonly") is not None
    assert (root.get("type"), root.find("os/type").text, root.find("os/type").get("machine")) == ("xen", "xen", "xenpv")
    assert root.find("devices/console/target").get("type") == "xen"
    assert root.findtext("bootloader") == "pygrub"
    assert root.find("devices/interface/source").get("bridge") == "br-lan"


def test_a_nic_without_network_uses_qemus_user_mode_network() -> None:
    root = ET.fromstring(domain_xml(replace(make_spec("qemu"), nics=(Nic("52:54:00:00:00:07"),))))
    interface = root.find("devices/interface")
    assert interface.get("type") == "user"
    assert interface.find("mac").get("address") == "52:54:00:00:00:07"


def test_values_are_escaped_not_interpolated() -> None:
    cmdline = "console=ttyS0 x=\"<a & b>\" y='</cmdline><devices/>'"
    root = ET.fromstring(domain_xml(replace(make_spec("qemu"), boot=DirectBoot(Path("/k"), None, cmdline))))
    assert root.findtext("os/cmdline") == cmdline
    assert len(root.findall("devices")) == 1


def test_target_names_continue_past_z() -> None:
    assert [target_dev("kvm", i) for i in (0, 25, 26, 27)] == ["vda", "vdz", "vdaa", "vdab"]


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "Web 1"},
        {"uuid": "not-a-uuid"},
        {"memory_bytes": 1000},
        {"vcpus": 0},
        {"hypervisor": "lxc"},
        {"nics": (Nic("52:54:00:00:00:zz"),)},
        {"nics": (Nic("52:54:00:00:00:01", network="lan", bridge="br0"),)},
    ],
)
def test_bad_specs_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        domain_xml(replace(make_spec("qemu"), **changes))


def test_xen_refuses_a_nic_without_network() -> None:
    with pytest.raises(InvalidInput):
        domain_xml(replace(make_spec("xen"), nics=(Nic("00:16:3e:00:00:01"),)))


def test_data_disks_follow_the_seed_named_by_their_lun_and_attach_as_the_same_element() -> None:
    spec = replace(make_spec("qemu"), disks=(IscsiDisk(TARGET, 1, "10.1.0.10", 3261, INITIATOR),), data=DATA)
    disks = ET.fromstring(domain_xml(spec)).findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb", "vdc", "vde"]
    assert [d.find("source").get("name") for d in disks[2:]] == [f"{TARGET}/3", f"{TARGET}/5"]
    shown = ET.canonicalize(ET.tostring(disks[3], encoding="unicode"), strip_text=True)
    assert shown == ET.canonicalize(data_disk_xml(DATA[1], "qemu"), strip_text=True)


def test_on_the_san_host_volumes_are_opened_by_path_named_by_their_lun() -> None:
    root = ET.fromstring(domain_xml(replace(make_spec("qemu"), disks=LOCAL[:1], seed=LOCAL[1], data=LOCAL[2:])))
    disks = [(d.get("type"), d.find("source").attrib, d.find("target").get("dev")) for d in root.findall("devices/disk")]
    assert disks == [("file", {"file": "/srv/pool/vm-1-disk"}, "vda"), ("file", {"file": "/srv/pool/vm-1-seed"}, "vdb"),
                     ("block", {"dev": "/dev/vg0/vm-1-data"}, "vdd")]
    assert not root.findall("devices/disk/source/host")


def test_a_vnc_display_listens_on_the_given_address_behind_its_password() -> None:
    root = ET.fromstring(domain_xml(replace(make_spec("qemu"), vnc=Vnc("10.1.0.11", "s3cr3t!x"))))
    graphics = root.find("devices/graphics")
    assert (graphics.get("type"), graphics.get("autoport"), graphics.get("passwd")) == ("vnc", "yes", "s3cr3t!x")
    assert graphics.find("listen").attrib == {"type": "address", "address": "10.1.0.11"}
    assert root.find("devices/video/model").get("type") == "vga"
    with pytest.raises(InvalidInput):
        domain_xml(replace(make_spec("qemu"), vnc=Vnc("10.1.0.11", "longer-than-8")))
