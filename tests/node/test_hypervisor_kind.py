"""A VM's domain type follows its server's hypervisor kind: the spec, the start job and the row agree,
and a server of unknown kind gets no domain (the start job on a real libvirtd: test_hypervisor_probe_lab.py)."""

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from sqlalchemy import select, update

import config
from errors import HypervisorUnknown
from models import ClusterServer, VirtualMachine, Volume
from models.db import transaction
from tasks.node.domains import domain_spec
from tests.fixtures import factories
from workers.node import probe
from workers.node.domain_xml import domain_xml

TARGET = "iqn.2026-11.org.laxcluster:site-a.vm-web1"


def server_kind(rt, name: str, kind: str | None, **values: object) -> None:
    with transaction(rt.sessions) as session:
        session.execute(update(ClusterServer).where(ClusterServer.name == name).values(hypervisor=kind, **values))


def vm_with_a_lun(rt, name: str) -> None:
    with transaction(rt.sessions) as session:
        vm = factories.vm(session, name, server="cs1", disk_bytes=1 << 30)
        session.execute(update(Volume).where(Volume.vm_id == vm.id).values(iscsi_target=TARGET, iscsi_lun=1))


def spec_on(rt, vm_name: str, server_name: str):
    with rt.sessions() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == vm_name))
        server = session.scalar(select(ClusterServer).where(ClusterServer.name == server_name))
        return domain_spec(session, vm, server, rt.config)


@pytest.mark.parametrize("kind", ["kvm", "qemu", "xen"])
def test_the_domain_type_is_the_servers_kind(app, rt, kind: str) -> None:
    vm_with_a_lun(rt, "web1")
    server_kind(rt, "cs1", kind)
    root = ET.fromstring(domain_xml(spec_on(rt, "web1", "cs1")))
    assert root.get("type") == kind
    disk = root.find("devices/disk/source")
    if kind == "xen":
        assert disk.get("dev") == f"/dev/disk/by-path/ip-10.252.0.10:3260-iscsi-{TARGET}-lun-1"
    else:
        assert (disk.get("protocol"), disk.get("name")) == ("iscsi", f"{TARGET}/1")


def test_a_server_of_unknown_kind_gets_no_domain(app, rt) -> None:
    vm_with_a_lun(rt, "web1")
    server_kind(rt, "cs1", None)
    with pytest.raises(HypervisorUnknown, match="the hypervisor kind of cs1 is not known yet"):
        spec_on(rt, "web1", "cs1")


def test_without_kvm_in_libvirts_capabilities_the_kind_is_qemu_and_no_probe_starts() -> None:
    # The test driver lists no kvm domain capabilities (and is not Xen).
    assert probe.detect("test:///default") == probe.Detected("qemu", "libvirt offers no kvm domains")


def test_the_config_refuses_a_hypervisor_kind_it_does_not_know(tmp_path: Path) -> None:
    path = tmp_path / "laxcluster.toml"
    cs1 = 'initiator = "iqn.2026-11.org.laxcluster:cs1"\n'
    path.write_text(config.DEFAULTS.read_text().replace(f'{cs1}hypervisor = "qemu"', f'{cs1}hypervisor = "lxc"'))
    with pytest.raises(ValueError, match="server cs1: hypervisor 'lxc' is not one of kvm, qemu, xen"):
        config.load(path, environ={})
    path.write_text(config.DEFAULTS.read_text().replace('uri = "qemu+tcp://10.251.0.10/system"\nhypervisor = "qemu"',
                                                        'uri = "qemu+tcp://10.251.0.10/system"\nhypervisor = "lxc"'))
    with pytest.raises(ValueError, match="SAN san-a: hypervisor 'lxc' is not one of kvm, qemu, xen"):
        config.load(path, environ={})
    path.write_text(config.DEFAULTS.read_text().replace(f'{cs1}hypervisor = "qemu"\n', cs1))
    assert [(s.name, s.hypervisor) for _, _, s in config.load(path, environ={}).servers()] == [
        ("cs1", None), ("cs2", "qemu"), ("cs3", "qemu")]
