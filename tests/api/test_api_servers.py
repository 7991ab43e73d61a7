"""Servers and the topology lists: facts as numbers with units in their names."""

from sqlalchemy import update

from models import ClusterServer
from models.db import transaction
from tests.fixtures.http import bearer


def test_servers_list_the_configured_servers_with_numeric_facts(rt, client, tokens):
    with transaction(rt.sessions) as session:
        session.execute(update(ClusterServer).where(ClusterServer.name == "cs1").values(
            cpu_count=2, cpu_mhz=2400, memory_total_bytes=8 << 30, memory_free_bytes=3 << 30, reachable=True))
    servers = client.get("/servers", headers=bearer(tokens["viewer"])).get_json()["items"]
    names = [server["name"] for server in servers]
    assert names == sorted(server.name for _, _, server in rt.config.servers())
    cs1 = client.get("/servers/cs1", headers=bearer(tokens["viewer"])).get_json()
    assert cs1 == servers[0]
    assert (cs1["cpu_count"], cs1["cpu_mhz"], cs1["memory_total_bytes"]) == (2, 2400, 8 << 30)
    assert cs1["cluster"] == "cluster-a" and cs1["site"] == "site-a" and cs1["reachable"] is True
    assert isinstance(cs1["memory_limit_bytes"], int)
    assert servers[1]["cpu_count"] is None and servers[1]["facts_updated_at"] is None


def test_servers_show_their_hypervisor_kind_and_where_it_came_from(rt, client, tokens):
    with transaction(rt.sessions) as session:
        session.execute(update(ClusterServer).where(ClusterServer.name == "cs2").values(
            hypervisor="kvm", hypervisor_evidence="kvm probe: the guest's kernel started (it printed its banner)"))
        session.execute(update(ClusterServer).where(ClusterServer.name == "cs3").values(
            hypervisor=None, hypervisor_evidence=None))
    servers = client.get("/servers", headers=bearer(tokens["viewer"])).get_json()["items"]
    assert {s["name"]: (s["hypervisor"], s["hypervisor_evidence"]) for s in servers} == {
        "cs1": ("qemu", "set in the configuration"),
        "cs2": ("kvm", "kvm probe: the guest's kernel started (it printed its banner)"),
        "cs3": (None, None),
    }
    assert client.get("/servers/cs2", headers=bearer(tokens["viewer"])).get_json()["hypervisor"] == "kvm"


def test_refresh_is_a_job_on_the_control_queue(client, tokens):
    response = client.post("/servers/refresh", headers=bearer(tokens["operator"]))
    assert response.status_code == 202
    job = response.get_json()
    assert (job["kind"], job["target"], job["queue"], job["state"]) == ("refresh-servers", "servers", "control", "queued")
    assert response.headers["Location"] == f"/jobs/{job['id']}"


def test_sites_clusters_and_sans_are_listed_from_the_inventory(rt, client, tokens):
    auth = bearer(tokens["viewer"])
    sites = client.get("/sites", headers=auth).get_json()["items"]
    assert [site["name"] for site in sites] == sorted(site.name for site in rt.config.sites)
    assert sites[0]["clusters"] == ["cluster-a"] and sites[0]["sans"] == ["san-a"]
    clusters = client.get("/clusters", headers=auth).get_json()["items"]
    assert {c["name"]: c["servers"] for c in clusters}["cluster-a"] == ["cs1", "cs2"]
    sans = client.get("/sans", headers=auth).get_json()["items"]
    assert sans[0]["name"] == "san-a" and sans[0]["backend"] == "reflink" and sans[0]["site"] == "site-a"
