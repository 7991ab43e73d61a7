"""VMs over HTTP: install reserves VM + lease + job together or nothing, the overview pages cheaply, actions are jobs."""

import ipaddress

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError

from models import AuditEvent, Cluster, Lease, San, Subnet, Template, VirtualMachine
from models.db import transaction
from tests.fixtures import factories
from tests.fixtures.http import assert_problem, bearer

INSTALL = {"name": "web1", "template": "tiny", "memory": "256M", "vcpus": 1, "disk": "1G", "subnet": "lan"}
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEJQujcdYiCL ops@example"


@pytest.fixture
def inventory(rt):
    """The `tiny` template on san-a and the `lan` subnet 10.40.0.10-200."""
    with transaction(rt.sessions) as session:
        factories.template(session)
        factories.subnet(session)


def counts(rt):
    with rt.sessions() as session:
        return factories.counts(session)


def install(client, tokens, **changes):
    body = {key: value for key, value in {**INSTALL, **changes}.items() if value is not None}
    return client.post("/vms", json=body, headers=bearer(tokens["operator"]))


def test_an_install_takes_the_template_of_the_asked_servers_site_else_of_the_first_site(rt, client, tokens, inventory):
    with transaction(rt.sessions) as session:
        factories.template(session, san="san-b")
    assert install(client, tokens, name="first").status_code == 202
    assert install(client, tokens, name="dr", server="cs3").status_code == 202
    with rt.sessions() as session:
        vms = list(session.scalars(select(VirtualMachine)))
        sans = {vm.name: session.get(San, session.get(Template, vm.template_id).san_id).name for vm in vms}
        clusters = {vm.name: session.get(Cluster, vm.cluster_id).name for vm in vms}
    assert sans == {"first": "san-a", "dr": "san-b"}
    assert clusters == {"first": "cluster-a", "dr": "cluster-b"}


def test_an_install_reserves_one_vm_one_lease_and_one_queued_job(rt, client, tokens, inventory):
    before = counts(rt)
    response = install(client, tokens, ssh_keys=[KEY], description="the web server", server="cs2", ha_priority=7)
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert (job["kind"], job["target"], job["queue"], job["state"]) == ("install-vm", "vm/web1", "control", "queued")
    assert job["params"] == {"vm": "web1", "disk_bytes": 1 << 30, "server": "cs2"}
    assert response.headers["Location"] == f"/jobs/{job['id']}"
    after = counts(rt)
    assert (after["vms"], after["leases"], after["jobs"]) == (before["vms"] + 1, before["leases"] + 1, before["jobs"] + 1)
    with rt.sessions() as session:
        vm = session.scalar(select(VirtualMachine).where(VirtualMachine.name == "web1"))
        lease = session.scalar(select(Lease).where(Lease.vm_id == vm.id))
        audit = session.scalar(select(AuditEvent).where(AuditEvent.action == "vm.install"))
    assert (vm.state, vm.memory_bytes, vm.vcpus, vm.ssh_keys, vm.description) == (
        "installing", 256 << 20, 1, [KEY], "the web server")
    assert lease.ip == "10.40.0.10" and lease.mac.startswith("52:54:00:") and lease.hostname == "web1"
    assert audit.target == "vm/web1" and audit.actor == "test-operator"
    shown = client.get("/vms/web1", headers=bearer(tokens["viewer"])).get_json()
    assert (shown["state"], shown["template"], shown["mac"], shown["ip"], shown["subnet"]) == (
        "installing", "tiny", lease.mac, "10.40.0.10", "lan")
    assert shown["volumes"] == [] and shown["server"] is None and shown["uuid"] == vm.uuid
    assert (shown["ha"], shown["ha_priority"], vm.ha, vm.ha_priority) == (True, 7, True, 7)


@pytest.mark.parametrize("changes, status, code, field", [
    ({"name": "Web_1"}, 422, "InvalidInput", "name"),
    ({"name": "-web"}, 422, "InvalidInput", "name"),
    ({"name": "web1\n"}, 422, "InvalidInput", "name"),
    ({"name": "w" * 64}, 422, "InvalidInput", "name"),
    ({"template": "nope"}, 422, "TemplateNotFound", "template"),
    ({"memory": "268435456"}, 422, "InvalidInput", "memory"),
    ({"memory": 268435456}, 422, "InvalidInput", "memory"),
    ({"memory": "32M"}, 422, "InvalidInput", "memory"),
    ({"memory": "65G"}, 422, "InvalidInput", "memory"),
    ({"disk": "3T"}, 422, "InvalidInput", "disk"),
    ({"disk": "1X"}, 422, "InvalidInput", "disk"),
    ({"disk": None}, 422, "InvalidInput", "disk"),
    ({"vcpus": 0}, 422, "InvalidInput", "vcpus"),
    ({"vcpus": 65}, 422, "InvalidInput", "vcpus"),
    ({"vcpus": "2"}, 422, "InvalidInput", "vcpus"),
    ({"subnet": "nowhere"}, 422, "UnknownSubnet", "subnet"),
    ({"server": "cs9"}, 422, "UnknownServer", "server"),
    ({"ssh_keys": ["not a key\nwith a newline"]}, 422, "InvalidInput", "ssh_keys"),
    ({"ssh_keys": KEY}, 422, "InvalidInput", "ssh_keys"),
    ({"description": "two\nlines"}, 422, "InvalidInput", "description"),
    ({"colour": "red"}, 422, "InvalidInput", "colour"),
    ({"ha": "yes"}, 422, "InvalidInput", "ha"),
    ({"ha_priority": 1001}, 422, "InvalidInput", "ha_priority"),
    ({"ha_priority": "5"}, 422, "InvalidInput", "ha_priority"),
])
def test_bad_input_is_refused_and_changes_nothing(rt, client, tokens, inventory, changes, status, code, field):
    before = counts(rt)
    body = assert_problem(install(client, tokens, **changes), status, code)
    assert body["field"] == field
    assert counts(rt) == before


def test_a_name_in_use_is_409_and_changes_nothing(rt, client, tokens, inventory):
    assert install(client, tokens).status_code == 202
    before = counts(rt)
    body = assert_problem(install(client, tokens, memory="512M"), 409, "VmExists")
    assert body["field"] == "name"
    assert counts(rt) == before


def test_a_full_range_is_409_no_address_and_leaves_no_vm(rt, client, tokens, inventory):
    with transaction(rt.sessions) as session:
        factories.subnet(session, "tiny-net", "10.41.0.0/29", "10.41.0.2", "10.41.0.3")
    for name in ("a1", "a2"):
        assert install(client, tokens, name=name, subnet="tiny-net").status_code == 202
    before = counts(rt)
    assert_problem(install(client, tokens, name="a3", subnet="tiny-net"), 409, "NoAddress")
    assert counts(rt) == before
    leases = client.get("/leases?subnet=tiny-net", headers=bearer(tokens["viewer"])).get_json()["items"]
    assert sorted(lease["ip"] for lease in leases) == ["10.41.0.2", "10.41.0.3"]


def test_leases_are_unique_per_subnet(rt, client, tokens, inventory):
    for index in range(5):
        assert install(client, tokens, name=f"u{index}").status_code == 202
    leases = client.get("/leases?subnet=lan", headers=bearer(tokens["viewer"])).get_json()["items"]
    assert len({lease["ip"] for lease in leases}) == len({lease["mac"] for lease in leases}) == 5
    assert all(ipaddress.ip_address(lease["ip"]) in ipaddress.ip_network("10.40.0.0/24") for lease in leases)
    with pytest.raises(IntegrityError), transaction(rt.sessions) as session:
        first = session.scalar(select(Lease).order_by(Lease.id))
        session.add(Lease(subnet_id=first.subnet_id, ip=first.ip, mac="52:54:00:ff:ff:ff", hostname="dup"))
    assert len(client.get("/leases", headers=bearer(tokens["viewer"])).get_json()["items"]) == 5


def test_a_retried_install_with_the_same_key_makes_nothing_twice(rt, client, tokens, inventory):
    headers = {**bearer(tokens["operator"]), "Idempotency-Key": "install-web1-once"}
    first = client.post("/vms", json=INSTALL, headers=headers)
    again = client.post("/vms", json=INSTALL, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.get_json()["id"] == again.get_json()["id"]
    assert counts(rt)["vms"] == 1 and counts(rt)["leases"] == 1
    # The same key with another request (memory is not a job parameter, but it is part of the request).
    other = client.post("/vms", json={**INSTALL, "memory": "512M"}, headers=headers)
    assert assert_problem(other, 422, "IdempotencyKeyReused")["job_id"] == first.get_json()["id"]
    assert counts(rt)["vms"] == 1


def _fill(rt, count: int, first: int = 0) -> None:
    """VMs number `first`.. `first + count - 1`, every other one running on cs1, each with a template, a disk and a lease."""
    with transaction(rt.sessions) as session:
        tiny = session.scalar(select(Template)) or factories.template(session)
        lan = session.scalar(select(Subnet)) or factories.subnet(session, cidr="10.50.0.0/16", start="10.50.0.1",
                                                                  end="10.50.255.254")
        for index in range(first, first + count):
            running = index % 2 == 0
            factories.vm(session, f"vm-{index:05d}", template_row=tiny, server="cs1" if running else None,
                         state="running" if running else "shut off", domain_id=index if running else None,
                         disk_bytes=(index + 1) << 20, lease_in=lan, ip=str(ipaddress.ip_address("10.50.0.1") + index),
                         cpu_time_ns=index * 1000, description=f"number {index}")


def test_the_overview_splits_active_and_inactive_and_shows_every_column(rt, client, tokens):
    _fill(rt, 4)
    page = client.get("/vms", headers=bearer(tokens["viewer"])).get_json()
    assert [vm["name"] for vm in page["active"]] == ["vm-00000", "vm-00002"]
    assert [vm["name"] for vm in page["inactive"]] == ["vm-00001", "vm-00003"]
    assert page["next"] is None
    vm2 = page["active"][1]
    assert {key: vm2[key] for key in ("server", "domain_id", "memory_bytes", "vcpus", "state", "cpu_time_ns",
                                      "disk_bytes", "ip", "template", "description")} == {
        "server": "cs1", "domain_id": 2, "memory_bytes": 256 << 20, "vcpus": 1, "state": "running", "cpu_time_ns": 2000,
        "disk_bytes": 3 << 20, "ip": "10.50.0.3", "template": "tiny", "description": "number 2"}
    assert vm2["mac"].startswith("52:54:00:")
    only_off = client.get("/vms?state=shut off", headers=bearer(tokens["viewer"])).get_json()
    assert only_off["active"] == [] and len(only_off["inactive"]) == 2


def test_the_overview_pages_by_name(rt, client, tokens):
    _fill(rt, 25)
    seen, after, pages = [], None, 0
    while True:
        query = "/vms?limit=10" + (f"&after={after}" if after else "")
        page = client.get(query, headers=bearer(tokens["viewer"])).get_json()
        names = sorted(vm["name"] for vm in page["active"] + page["inactive"])
        seen += names
        pages += 1
        after = page["next"]
        if after is None:
            break
        assert after == names[-1] and len(names) == 10
    assert pages == 3 and seen == [f"vm-{index:05d}" for index in range(25)]
    auth = bearer(tokens["viewer"])
    assert assert_problem(client.get("/vms?limit=1001", headers=auth), 422, "InvalidInput")["field"] == "limit"
    assert assert_problem(client.get("/vms?after=Bad!", headers=auth), 422, "InvalidInput")["field"] == "after"


def test_the_overview_costs_the_same_few_statements_for_10_or_200_vms(rt, client, tokens):
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args):
        statements.append(statement)

    def cost() -> int:
        statements.clear()
        response = client.get("/vms?limit=1000", headers=bearer(tokens["viewer"]))
        assert response.status_code == 200
        return len(statements), len(response.get_json()["active"]) + len(response.get_json()["inactive"])

    _fill(rt, 10)
    client.get("/vms", headers=bearer(tokens["viewer"]))  # the token's first use writes last_used_at once
    event.listen(rt.engine, "before_cursor_execute", count)
    try:
        small = cost()
        _fill(rt, 190, first=10)
        large = cost()
    finally:
        event.remove(rt.engine, "before_cursor_execute", count)
    assert small[1] == 10 and large[1] == 200
    assert any("FROM virtual_machines" in statement for statement in statements)
    assert small[0] == large[0] <= 6, statements


def test_power_actions_and_delete_are_jobs_on_the_vms_lock(rt, client, tokens):
    _fill(rt, 1)
    operator = bearer(tokens["operator"])
    for action in ("start", "shutdown", "reboot", "destroy"):
        response = client.post(f"/vms/vm-00000/actions/{action}", headers=operator)
        assert response.status_code == 202, response.get_data(as_text=True)
        job = response.get_json()
        assert (job["kind"], job["target"], job["queue"], job["params"]) == (action, "vm/vm-00000", "control", {"vm": "vm-00000"})
        assert client.post(f"/jobs/{job['id']}/cancel", headers=operator).status_code == 200  # frees the lock
    timed = client.post("/vms/vm-00000/actions/shutdown", json={"timeout_s": 30}, headers=operator).get_json()
    assert timed["params"] == {"vm": "vm-00000", "timeout_s": 30}
    busy = assert_problem(client.delete("/vms/vm-00000", headers=operator), 409, "TargetBusy")
    assert busy["job_id"] == timed["id"]
    client.post(f"/jobs/{timed['id']}/cancel", headers=operator)
    deleted = client.delete("/vms/vm-00000", headers=operator)
    assert deleted.status_code == 202 and deleted.get_json()["kind"] == "delete-vm"


def test_unknown_actions_and_vms_are_404_and_queue_nothing(rt, client, tokens):
    _fill(rt, 1)
    operator = bearer(tokens["operator"])
    before = counts(rt)
    assert assert_problem(client.post("/vms/vm-00000/actions/fly", headers=operator), 404, "UnknownAction")["action"] == "fly"
    assert_problem(client.post("/vms/ghost/actions/start", headers=operator), 404, "VmNotFound")
    assert_problem(client.delete("/vms/ghost", headers=operator), 404, "VmNotFound")
    assert_problem(client.get("/vms/ghost", headers=bearer(tokens["viewer"])), 404, "VmNotFound")
    field = assert_problem(client.post("/vms/vm-00000/actions/start", json={"timeout_s": 5}, headers=operator),
                           422, "InvalidInput")["field"]
    assert field == "timeout_s"
    assert_problem(client.post("/vms/vm-00000/actions/start", headers=bearer(tokens["viewer"])), 403, "Forbidden")
    assert counts(rt) == before


def test_show_lists_the_vms_volumes(rt, client, tokens):
    _fill(rt, 1)
    shown = client.get("/vms/vm-00000", headers=bearer(tokens["viewer"])).get_json()
    assert [(v["name"], v["role"], v["size_bytes"], v["san"], v["vm"]) for v in shown["volumes"]] == [
        ("vm-00000-disk", "disk", 1 << 20, "san-a", "vm-00000")]
    assert shown["server"] == "cs1" and shown["ip"] == "10.50.0.1" and shown["disk_bytes"] == 1 << 20
