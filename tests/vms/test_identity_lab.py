"""A VM's volumes and domain are found by ids nobody chooses (its UUID), never by its name: a leftover
volume or a foreign domain that happens to carry the VM's name is neither adopted nor destroyed."""

import uuid

import pytest

from models import FAILED, SUCCEEDED
from tasks.san.volumes import san_place
from tests.fixtures.vms import disk_handle, domain_named, install, server_uri, unique, vm_uuid
from workers.node import domains
from workers.node.host import connect

pytestmark = [pytest.mark.integration, pytest.mark.lab]

MARK = b"left by someone else\n"


def test_a_new_vm_does_not_adopt_a_volume_named_after_it(cluster, celery_app):
    rt = cluster
    name = unique("adopt")
    backend = san_place(rt.config, "san-a").backend
    leftover = backend.create(f"{name}-disk", 4 << 20)  # what an earlier VM of this name would have left
    try:
        with open(backend.path_for_export(leftover), "r+b") as disk:
            disk.write(MARK)
        job = install(rt, celery_app, name)
        assert job.state == SUCCEEDED, job.error_message
        handle = disk_handle(rt, name)
        assert handle == f"vm-{vm_uuid(rt, name)}-disk"
        with open(backend.path_for_export(leftover), "rb") as disk:
            assert disk.read(len(MARK)) == MARK
        with open(backend.path_for_export(handle), "rb") as disk:
            assert disk.read(len(MARK)) != MARK
    finally:
        backend.delete(leftover)


def test_an_install_never_removes_a_same_named_domain_it_does_not_own(cluster, celery_app):
    rt = cluster
    name, foreign = unique("twin"), str(uuid.uuid4())
    uri = server_uri(rt, "cs1")
    conn = connect(uri)
    try:
        conn.defineXML(f"<domain type='qemu'><name>{name}</name><uuid>{foreign}</uuid>"
                       "<memory unit='MiB'>32</memory><os><type arch='x86_64'>hvm</type></os></domain>")
        job = install(rt, celery_app, name, server="cs1")
        assert (job.state, job.error_code) == (FAILED, "DomainFailed"), job.error_message
        survivor = domain_named(uri, name)
        assert survivor is not None and survivor.uuid == foreign
    finally:
        domains.undefine(uri, foreign)
        conn.close()
