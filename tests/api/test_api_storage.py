"""Storage over HTTP: SAN pool facts, volumes, resize and template import as jobs on the SAN's queue."""

import pytest
from sqlalchemy import select, update

from models import San, Volume
from models.db import transaction
from tests.fixtures import factories
from tests.fixtures.http import assert_problem, bearer

GIB = 1 << 30


def counts(rt):
    with rt.sessions() as session:
        return factories.counts(session)


def test_sans_show_pool_size_free_used_and_reflink_from_their_facts(rt, client, tokens):
    with transaction(rt.sessions) as session:
        session.execute(update(San).where(San.name == "san-a").values(
            facts={"backend": "reflink", "total_bytes": 20 * GIB, "free_bytes": 15 * GIB, "reflink": True}))
    sans = {san["name"]: san for san in client.get("/sans", headers=bearer(tokens["viewer"])).get_json()["items"]}
    san_a = sans["san-a"]
    assert (san_a["backend"], san_a["site"], san_a["portal"], san_a["reflink"]) == ("reflink", "site-a", "10.252.0.10:3260", True)
    assert (san_a["pool_size_bytes"], san_a["pool_free_bytes"], san_a["pool_used_bytes"]) == (20 * GIB, 15 * GIB, 5 * GIB)
    never_refreshed = sans["san-b"]
    assert never_refreshed["pool_size_bytes"] is None and never_refreshed["pool_used_bytes"] is None
    assert never_refreshed["reflink"] is None and never_refreshed["facts"] == {}


def test_a_san_refresh_is_a_job_on_its_sites_queue(client, tokens):
    response = client.post("/sans/san-b/refresh", headers=bearer(tokens["operator"]))
    assert response.status_code == 202
    job = response.get_json()
    assert (job["kind"], job["target"], job["queue"], job["params"]) == ("refresh-san", "san/san-b", "san.site-b", {"san": "san-b"})
    assert_problem(client.post("/sans/san-z/refresh", headers=bearer(tokens["operator"])), 404, "SanNotFound")


def _volume(rt) -> int:
    with transaction(rt.sessions) as session:
        factories.vm(session, "web1", disk_bytes=GIB)
        return session.scalar(select(Volume.id).where(Volume.name == "web1-disk"))


def test_volumes_are_listed_per_san_and_shown_by_id(rt, client, tokens):
    volume_id = _volume(rt)
    viewer = bearer(tokens["viewer"])
    listed = client.get("/sans/san-a/volumes", headers=viewer).get_json()["items"]
    assert [(v["id"], v["name"], v["vm"], v["role"], v["size_bytes"]) for v in listed] == [
        (volume_id, "web1-disk", "web1", "disk", GIB)]
    assert client.get(f"/volumes/{volume_id}", headers=viewer).get_json() == listed[0]
    assert client.get("/sans/san-b/volumes", headers=viewer).get_json()["items"] == []
    assert_problem(client.get("/sans/nope/volumes", headers=viewer), 404, "SanNotFound")
    assert_problem(client.get(f"/volumes/{volume_id + 1}", headers=viewer), 404, "VolumeNotFound")
    assert assert_problem(client.get("/volumes/abc", headers=viewer), 422, "InvalidInput")["field"] == "volume_id"


def test_a_resize_is_a_job_on_the_volumes_san_queue(rt, client, tokens):
    volume_id = _volume(rt)
    operator = bearer(tokens["operator"])
    response = client.post(f"/volumes/{volume_id}/actions/resize", json={"size": "2G"}, headers=operator)
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert (job["kind"], job["target"], job["queue"]) == ("resize-volume", "vm/web1", "san.site-a")
    assert job["params"] == {"volume_id": volume_id, "size_bytes": 2 * GIB}
    before = counts(rt)
    for size in ("2", 2 * GIB, "3T", "1M", "big"):
        problem = assert_problem(client.post(f"/volumes/{volume_id}/actions/resize", json={"size": size},
                                             headers=operator), 422, "InvalidInput")
        assert problem["field"] == "size"
    assert_problem(client.post(f"/volumes/{volume_id + 1}/actions/resize", json={"size": "2G"}, headers=operator),
                   404, "VolumeNotFound")
    assert counts(rt) == before


def test_templates_are_listed_with_their_san(rt, client, tokens):
    with transaction(rt.sessions) as session:
        factories.template(session, "tiny", boot={"kernel": "/srv/vmlinuz"})
        factories.template(session, "debian", san="san-b", os="debian12", default_size_bytes=4 * GIB)
    items = client.get("/templates", headers=bearer(tokens["viewer"])).get_json()["items"]
    assert [(t["name"], t["san"], t["site"], t["os"], t["direct_boot"]) for t in items] == [
        ("debian", "san-b", "site-b", "debian12", False), ("tiny", "san-a", "site-a", "linux", True)]
    only_b = client.get("/templates?san=san-b", headers=bearer(tokens["viewer"])).get_json()["items"]
    assert [t["name"] for t in only_b] == ["debian"] and only_b[0]["default_size_bytes"] == 4 * GIB


def test_a_template_import_is_a_job_on_the_sans_queue(rt, client, tokens):
    images = rt.config.import_dir
    body = {"name": "alpine", "san": "san-b", "source_path": f"{images}/os//alpine.qcow2", "format": "qcow2",
            "os": "alpine3", "default_size": "2G"}
    response = client.post("/templates", json=body, headers=bearer(tokens["admin"]))
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert (job["kind"], job["target"], job["queue"]) == ("import-template", "template/san-b/alpine", "san.site-b")
    assert job["params"] == {"name": "alpine", "san": "san-b", "source_path": f"{images}/os/alpine.qcow2",
                             "format": "qcow2", "os": "alpine3", "default_size_bytes": 2 * GIB}


def test_only_an_admin_may_import_a_template(rt, client, tokens):
    before = counts(rt)
    body = {"name": "alpine", "san": "san-a", "source_path": f"{rt.config.import_dir}/alpine.raw", "format": "raw"}
    assert_problem(client.post("/templates", json=body, headers=bearer(tokens["operator"])), 403, "Forbidden")
    assert counts(rt) == before


@pytest.mark.parametrize("changes, status, code, field", [
    ({"source_path": "images/tiny.raw"}, 422, "InvalidInput", "source_path"),
    ({"source_path": "/srv/../etc/shadow"}, 422, "InvalidInput", "source_path"),
    ({"source_path": "/srv/a\nb"}, 422, "InvalidInput", "source_path"),
    ({"san": "san-z"}, 422, "UnknownSan", "san"),
    ({"name": "Tiny"}, 422, "InvalidInput", "name"),
    ({"os": "Debian 12"}, 422, "InvalidInput", "os"),
    ({"default_size": "1024"}, 422, "InvalidInput", "default_size"),
    ({"format": "vmdk"}, 422, "InvalidInput", "format"),
    ({"format": None}, 422, "InvalidInput", "format"),
    ({"source_path": "/etc/shadow"}, 422, "ImportSourceRefused", "source_path"),
    ({"source_path": "{images}-elsewhere/alpine.raw"}, 422, "ImportSourceRefused", "source_path"),
    ({"source_path": "{images}"}, 422, "ImportSourceRefused", "source_path"),
    ({"name": "tiny"}, 409, "TemplateExists", None),
])
def test_bad_template_imports_are_refused_and_queue_nothing(rt, client, tokens, changes, status, code, field):
    with transaction(rt.sessions) as session:
        factories.template(session, "tiny")
    before = counts(rt)
    body = {"name": "alpine", "san": "san-a", "source_path": "{images}/alpine.raw", "format": "raw", **changes}
    body["source_path"] = body["source_path"].replace("{images}", str(rt.config.import_dir))
    problem = assert_problem(client.post("/templates", json=body, headers=bearer(tokens["admin"])), status, code)
    assert problem.get("field") == field
    assert counts(rt) == before
