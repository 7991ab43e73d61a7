"""The qemu domain XML boots the tiny template for real: root disk over iSCSI, NoCloud seed, serial console."""

import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from lab.processes import wait_until
from lab.template import TinyTemplate
from tests.fixtures.vms import unique
from tests.fixtures.san import TgtDaemon
from tests.support import need_binary
from workers.node.console import SerialConsole
from workers.node.domain_xml import DirectBoot, DomainSpec, FileDisk, IscsiDisk, Nic, domain_xml
from workers.san.seed import make_seed

IQN_PREFIX = "iqn.2025-01.org.laxcluster.test"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTheTinyBootTest0 tester@lab"
BOOT_LINE = re.compile(r"LAXCLUSTER-BOOT hostname=(\S+) ip=(\S+)")


@pytest.fixture
def defined(system_libvirt: libvirt.virConnect) -> Iterator[list[libvirt.virDomain]]:
    """Domains the test defines; destroyed and undefined afterwards, even on failure."""
    domains: list[libvirt.virDomain] = []
    yield domains
    for dom in domains:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


@pytest.mark.integration
def test_tiny_boots_from_iscsi_configures_itself_from_the_seed_and_shuts_down(
    system_libvirt: libvirt.virConnect, tgtd: TgtDaemon, tiny: TinyTemplate, tiny_dir: Path, defined: list[libvirt.virDomain]
) -> None:
    need_binary("qemu-system-x86_64", "mkfs.vfat", "mcopy")
    name = unique("tiny-boot")
    work = tiny_dir / name
    work.mkdir(mode=0o755)
    root_disk, kernel, initrd = work / "root.img", work / "vmlinuz", work / "initrd"
    # Own copies: libvirt relabels the files a domain boots from, and refuses a kernel that a domain of
    # another libvirtd (the lab's, with other DAC owners) still holds.
    for source, copy in ((tiny.disk, root_disk), (tiny.kernel, kernel), (tiny.initrd, initrd)):
        shutil.copyfile(source, copy)
    target_iqn, initiator_iqn = f"{IQN_PREFIX}:{name}", f"{IQN_PREFIX}:cs-{name}"
    tgtd.tgt.ensure_target(target_iqn)
    tgtd.tgt.export_lun(target_iqn, 1, str(root_disk))
    tgtd.tgt.bind_initiators(target_iqn, [initiator_iqn])
    seed = make_seed(work / "seed.img", hostname=name, mac="52:54:00:4c:58:01", ip_cidr="10.77.0.5/24", gateway="10.77.0.1", ssh_keys=[KEY])
    spec = DomainSpec(
        name=name,
        uuid=str(uuid.uuid4()),
        memory_bytes=256 * 1024 * 1024,
        vcpus=1,
        hypervisor="qemu",
        disks=(IscsiDisk(target_iqn, 1, "127.0.0.1", tgtd.port, initiator_iqn),),
        seed=FileDisk(seed),
        nics=(Nic("52:54:00:4c:58:01"),),
        boot=DirectBoot(kernel, initrd, tiny.cmdline),
    )
    dom = system_libvirt.defineXML(domain_xml(spec))
    defined.append(dom)
    # Start paused so the console is attached before the guest prints anything.
    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    with SerialConsole(dom) as console:
        started = time.monotonic()
        dom.resume()
        boot = console.read_until(BOOT_LINE, timeout=120)
        print(f"\ntiny reached its boot line {time.monotonic() - started:.1f} s after resume")
        assert boot.groups() == (name, "10.77.0.5")
        # The console answers: the shell on ttyS0 shows the installed key.
        console.write(b"\ncat /root/.ssh/authorized_keys; echo KEYS-$((40 + 2))\n")
        keys = console.read_until(r"(?s)(\S+ \S+ tester@lab)\s+KEYS-42", timeout=30)
        assert keys.group(1) == KEY
    # libvirt's shutdown (the ACPI power button) powers tiny off cleanly.
    assert dom.isActive()
    dom.shutdown()
    wait_until(lambda: not dom.isActive(), 60, "tiny to power off after an ACPI shutdown")
