"""What the check's inspections read: a backend's volumes and snapshots, a libvirt's domains by UUID.
(tgtd's listing is tests/san/test_tgt.py's; the lab test drives all three for real.)"""

import uuid

import libvirt
import pytest

from workers.node import domains
from workers.san.reflink import ReflinkBackend

TEST_URI = "test:///default"


def test_a_reflink_pool_lists_volumes_and_snapshots_but_no_staging_or_stray_files(tmp_path):
    backend = ReflinkBackend(str(tmp_path))
    backend.create("vm-1-disk", 1 << 20)
    snap = backend.snapshot("vm-1-disk", "bk-1")
    for stray in (".vm-2-disk.img.1a2b.tmp", "notes.txt", "Bad_Name.img", "vm-3@x.img"):
        (tmp_path / stray).write_bytes(b"")
    (tmp_path / "lost+found").mkdir()
    assert backend.listing() == {"vm-1-disk": str(tmp_path / "vm-1-disk.img"), snap: str(tmp_path / "vm-1-disk@bk-1.snap")}


@pytest.fixture
def stopped_domain():
    """A domain defined (not running) on libvirt's in-process test driver; undefined afterwards."""
    conn = libvirt.open(TEST_URI)
    made = str(uuid.uuid4())
    conn.defineXML(f"<domain type='test'><name>chk-{made[:8]}</name><uuid>{made}</uuid>"
                   "<memory>65536</memory><os><type>hvm</type></os></domain>")
    yield made
    try:
        conn.lookupByUUIDString(made).undefine()
    except libvirt.libvirtError:
        pass
    conn.close()


def test_domains_are_listed_by_uuid_and_only_a_stopped_one_is_undefined(stopped_domain):
    listed = {d["uuid"]: d for d in domains.listing(TEST_URI)}
    assert listed[stopped_domain]["state"] == "shut off"
    running = next(d for d in listed.values() if d["state"] == "running")  # the test driver's own "test" domain
    assert domains.undefine_inactive(TEST_URI, running["uuid"]) is False
    assert domains.undefine_inactive(TEST_URI, stopped_domain) is True
    assert domains.undefine_inactive(TEST_URI, stopped_domain) is True  # gone already: done
    assert stopped_domain not in {d["uuid"] for d in domains.listing(TEST_URI)}
