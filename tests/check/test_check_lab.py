"""`laxcluster check` on the lab: an installed VM is no drift; drift made by hand with the real tools (tgtadm,
the SAN's pool, libvirt, the DB) is listed exactly, `--repair` fixes it on the real daemons, and the
next check is clean. The CLI's exit status and the API's report follow."""

import json
import uuid
from collections.abc import Iterator

import libvirt
import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import insert, select

from cli.main import cli
from models import SUCCEEDED, Lease, Subnet, VirtualMachine, Volume
from tasks.san.storage import backend_for, site_initiators, target_for
from tests.fixtures.check import assert_clean, drift_key, new_drifts
from tests.fixtures.vms import install, server_uri, unique, wait_job
from workers.command import run
from workers.node import domains
from workers.node.host import connect

pytestmark = [pytest.mark.integration, pytest.mark.lab]
ORPHAN_DOMAIN_XML = """<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>32</memory>
<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"""


@pytest.fixture
def orphans(checked_cluster) -> Iterator[dict[str, str]]:
    """Names for an orphan volume on san-a and an orphan domain on cs2; whatever of them is left is removed."""
    made = {"volume": f"vm-{uuid.uuid4()}-disk", "domain": str(uuid.uuid4())}
    yield made
    _, san = checked_cluster.config.san("san-a")
    backend_for(san).delete(made["volume"])
    domains.undefine_inactive(server_uri(checked_cluster, "cs2"), made["domain"])


def laxcluster(api_url: str, token: str, *args: str):
    return CliRunner().invoke(cli, ["--url", api_url, "--token", token, *args], catch_exceptions=False)


def test_check_lists_exactly_the_drift_made_by_hand_and_repairs_it(checked_cluster, drift_baseline, celery_app,
                                                                   orphans, api_url, tokens):
    rt, name = checked_cluster, unique("chk")
    assert install(rt, celery_app, name).state == SUCCEEDED
    assert_clean(rt, celery_app, drift_baseline)
    _, san = rt.config.san("san-a")
    iqn, lease_id = vm_target(rt, name), orphan_lease(rt)

    # Drift by hand, with the real tools.
    tgt = target_for(san)
    run(tgt.argv("--op", "delete", "--mode", "target", "--tid", str(tgt.find(iqn).tid), "--force"))
    backend_for(san).create(orphans["volume"], 1 << 20)
    define_stopped_domain(server_uri(rt, "cs2"), orphans["domain"])
    made = {("missing", "target", "san-a", iqn), ("orphan", "volume", "san-a", orphans["volume"]),
            ("orphan", "domain", "cs2", orphans["domain"]), ("orphan", "lease", "inventory", str(lease_id))}

    found = laxcluster(api_url, tokens["operator"], "check", "--json")
    assert found.exit_code == 1, found.output
    report = json.loads(found.stdout)
    drifts = new_drifts(report, drift_baseline)
    assert {drift_key(d) for d in drifts} == made and all(d["safe"] for d in drifts)
    latest = requests.get(f"{api_url}/check", headers=bearer(tokens["viewer"]), timeout=10).json()
    assert latest["drifts"] == report["drifts"] and latest["clean"] is False

    started = requests.post(f"{api_url}/check", json={"repair": True}, headers=bearer(tokens["operator"]), timeout=10)
    assert started.status_code == 202 and started.headers["Location"].endswith(started.json()["id"])
    repaired = wait_job(rt, started.json()["id"], timeout=240)
    assert repaired.state == SUCCEEDED, repaired.error_message
    assert made <= {drift_key(d) for d in repaired.result["repaired"]}, repaired.result

    # The daemons and the DB agree with the inventory again.
    exported = tgt.find(iqn)
    with rt.sessions() as session:
        allowed = site_initiators(session, rt.config.san("san-a")[0])
    assert exported is not None and set(exported.initiators) == set(allowed)
    assert sorted(exported.luns) == [1, 2]
    assert orphans["volume"] not in backend_for(san).listing()
    assert not domain_defined(server_uri(rt, "cs2"), orphans["domain"])
    with rt.sessions() as session:
        assert session.get(Lease, lease_id) is None
    assert_clean(rt, celery_app, drift_baseline)
    clean = laxcluster(api_url, tokens["operator"], "check")
    assert clean.exit_code == (1 if drift_baseline else 0), clean.output
    assert f"{len(drift_baseline)} drift(s), 0 repaired" in clean.stdout


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def vm_target(rt, name: str) -> str:
    with rt.sessions() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == name))
        return session.scalar(select(Volume.iscsi_target).where(Volume.vm_id == vm.id, Volume.role == "disk"))


def orphan_lease(rt) -> int:
    """A lease naming a VM id no row has (as a VM row deleted behind the IPAM's back leaves it)."""
    with rt.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # the lab tests' DB is SQLite
        subnet = conn.scalar(select(Subnet.id).where(Subnet.name == "lan"))
        lease_id = conn.execute(insert(Lease).values(subnet_id=subnet, vm_id=987654, mac="52:54:00:c4:ec:01",
                                                     ip="192.0.2.4", hostname="ghost")).inserted_primary_key[0]
        conn.commit()
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")
    return lease_id


def define_stopped_domain(uri: str, domain_uuid: str) -> None:
    conn = connect(uri)
    try:
        conn.defineXML(ORPHAN_DOMAIN_XML.format(name=f"orphan-{domain_uuid[:8]}", uuid=domain_uuid))
    finally:
        conn.close()


def domain_defined(uri: str, domain_uuid: str) -> bool:
    conn = connect(uri)
    try:
        conn.lookupByUUIDString(domain_uuid)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()
