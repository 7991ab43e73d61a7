"""The network DB over HTTP: subnets are a plain audited DB change, leases are listed and exported as host files."""

import pytest
from sqlalchemy import select

from models import AuditEvent
from models.db import transaction
from tests.fixtures import factories
from tests.fixtures.http import assert_problem, bearer

LAN = {"name": "lan", "cidr": "10.60.0.0/24", "gateway": "10.60.0.1", "dns": ["10.60.0.2", "10.60.0.3"],
       "range_start": "10.60.0.100", "range_end": "10.60.0.199", "mac_prefix": "00:16:3E"}


def counts(rt):
    with rt.sessions() as session:
        return factories.counts(session)


def test_an_admin_adds_a_subnet_and_it_is_audited(rt, client, tokens):
    response = client.post("/subnets", json=LAN, headers=bearer(tokens["admin"]))
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.headers["Location"] == "/subnets/lan"
    created = response.get_json()
    assert created == {**LAN, "mac_prefix": "00:16:3e"}
    listed = client.get("/subnets", headers=bearer(tokens["viewer"])).get_json()["items"]
    assert [subnet for subnet in listed if subnet["name"] == "lan"] == [created]
    assert client.get("/subnets/lan", headers=bearer(tokens["viewer"])).get_json() == created
    with rt.sessions() as session:
        audit = session.scalar(select(AuditEvent).where(AuditEvent.action == "subnet.create"))
    assert (audit.actor, audit.target, audit.details["cidr"]) == ("test-admin", "subnet/lan", "10.60.0.0/24")
    assert counts(rt)["jobs"] == 0


@pytest.mark.parametrize("changes, status, code, field", [
    ({"name": "LAN"}, 422, "InvalidInput", "name"),
    ({"cidr": "10.60.0.0/33"}, 422, "InvalidInput", "cidr"),
    ({"cidr": "10.60.0.1/24"}, 422, "InvalidInput", "cidr"),
    ({"range_start": "10.61.0.1"}, 422, "InvalidInput", "range_start"),
    ({"range_end": "10.60.0.50"}, 422, "InvalidInput", "range_start"),
    ({"gateway": "192.168.0.1"}, 422, "InvalidInput", "gateway"),
    ({"dns": "10.60.0.2"}, 422, "InvalidInput", "dns"),
    ({"dns": ["resolver"]}, 422, "InvalidInput", "dns"),
    ({"mac_prefix": "52:54"}, 422, "InvalidInput", "mac_prefix"),
    ({"vlan": 12}, 422, "InvalidInput", "vlan"),
])
def test_bad_subnets_are_refused_and_change_nothing(rt, client, tokens, changes, status, code, field):
    before = counts(rt)
    body = assert_problem(client.post("/subnets", json={**LAN, **changes}, headers=bearer(tokens["admin"])), status, code)
    assert body["field"] == field
    assert counts(rt) == before


def test_a_subnet_name_is_taken_once_and_needs_an_admin(rt, client, tokens):
    assert client.post("/subnets", json=LAN, headers=bearer(tokens["admin"])).status_code == 201
    before = counts(rt)
    assert_problem(client.post("/subnets", json={**LAN, "cidr": "10.70.0.0/24", "range_start": "10.70.0.1",
                                                 "range_end": "10.70.0.9", "gateway": None, "dns": []},
                               headers=bearer(tokens["admin"])), 409, "SubnetExists")
    assert_problem(client.post("/subnets", json={**LAN, "name": "lan2"}, headers=bearer(tokens["operator"])), 403, "Forbidden")
    assert counts(rt) == before


def test_leases_are_listed_by_subnet_and_vm_and_exported_as_host_files(rt, client, tokens):
    with transaction(rt.sessions) as session:
        lan, dmz = factories.subnet(session), factories.subnet(session, "dmz", "10.41.0.0/24", "10.41.0.5", "10.41.0.9")
        factories.vm(session, "web1", lease_in=lan, ip="10.40.0.11")
        factories.vm(session, "db1", lease_in=lan, ip="10.40.0.10")
        factories.vm(session, "edge", lease_in=dmz, ip="10.41.0.5")
    viewer = bearer(tokens["viewer"])
    everything = client.get("/leases", headers=viewer).get_json()["items"]
    assert sorted((lease["subnet"], lease["vm"], lease["ip"]) for lease in everything) == [
        ("dmz", "edge", "10.41.0.5"), ("lan", "db1", "10.40.0.10"), ("lan", "web1", "10.40.0.11")]
    assert [lease["vm"] for lease in client.get("/leases?subnet=dmz", headers=viewer).get_json()["items"]] == ["edge"]
    web1 = client.get("/leases?vm=web1", headers=viewer).get_json()["items"]
    assert len(web1) == 1 and web1[0]["hostname"] == "web1"
    dnsmasq = client.get("/subnets/lan/hosts", headers=viewer)
    assert dnsmasq.mimetype == "text/plain"
    db1_mac = next(lease["mac"] for lease in everything if lease["vm"] == "db1")
    assert dnsmasq.get_data(as_text=True).splitlines() == [f"{db1_mac},10.40.0.10,db1", f"{web1[0]['mac']},10.40.0.11,web1"]
    isc = client.get("/subnets/lan/hosts?format=isc", headers=viewer).get_data(as_text=True)
    assert f"host db1 {{ hardware ethernet {db1_mac}; fixed-address 10.40.0.10; }}" in isc.splitlines()
    assert assert_problem(client.get("/subnets/lan/hosts?format=bind", headers=viewer), 422, "InvalidInput")["field"] == "format"
    assert_problem(client.get("/subnets/nope/hosts", headers=viewer), 404, "SubnetNotFound")
    assert assert_problem(client.get("/leases?vm=Not_A_Name", headers=viewer), 422, "InvalidInput")["field"] == "vm"
