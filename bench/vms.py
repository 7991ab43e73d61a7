"""The VM overview at 10,000 VMs (issue 5): `GET /vms` pages beside the bare SQL of the same page.

Fills a fresh SQLite inventory with `--vms` VMs (each with a lease and two volumes), then times
through the Flask app (test client, so no network stack is measured): the first page
(`limit=100`), a page from the middle (`after=<name>`), and the largest page (`limit=1000`);
beside each, the baseline: the page's VM rows selected with plain SQL on the same engine. Prints
p50/p95 of each with the ratio and writes `bench/results/vms.json` with the issue's goal (first page
of 100 in <= 5 ms, p50) and whether it was met. Cleans up its directory.

Run: `.venv/bin/python bench/vms.py [--vms 10000] [--rounds 30]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from sqlalchemy import insert, text

import config
from benchkit import write_results
from api import create_app
from cli.tokens import create_token
from models import Cluster, ClusterServer, Lease, San, Site, Subnet, Template, VirtualMachine, Volume
from models.db import migrate, transaction
from tasks.app import make_celery
from tasks.runtime import make_runtime

GOAL_FIRST_PAGE_MS = 5.0

def fill(rt, count: int) -> None:
    """Insert `count` VMs on two servers, each with a lease and a disk and seed volume, in bulk."""
    with transaction(rt.sessions) as session:
        site = Site(name="site-a")
        cluster = Cluster(name="cluster-a", site=site)
        servers = [ClusterServer(name=f"cs{i}", cluster=cluster, libvirt_uri=f"test:///cs{i}", initiator_iqn=f"iqn.2026-11.org.example:cs{i}")
                   for i in (1, 2)]
        san = San(name="san-a", site=site, backend="reflink", pool_path="/srv/pool", portal="127.0.0.1:3260")
        subnet = Subnet(name="big", cidr="10.0.0.0/16", range_start="10.0.0.1", range_end="10.0.255.254")
        session.add_all([site, cluster, *servers, san, subnet])
        session.flush()
        template = Template(name="tiny", san_id=san.id, default_size_bytes=1 << 30)
        session.add(template)
        session.flush()
        vms = [{"name": f"vm-{i:05d}", "uuid": f"00000000-0000-4000-8000-{i:012d}", "template_id": template.id,
                "cluster_id": cluster.id, "server_id": servers[i % 2].id, "memory_bytes": 256 << 20, "vcpus": 1,
                "state": "running" if i % 3 else "shut off", "description": f"VM number {i}"} for i in range(count)]
        session.execute(insert(VirtualMachine), vms)
        ids = dict(session.execute(text("SELECT name, id FROM virtual_machines")).all())
        session.execute(insert(Lease), [{"subnet_id": subnet.id, "vm_id": ids[vm["name"]], "hostname": vm["name"],
                                         "mac": f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                                         "ip": f"10.0.{i >> 8 & 255}.{i & 255}"} for i, vm in enumerate(vms)])
        session.execute(insert(Volume), [{"name": f"{vm['name']}-{role}", "san_id": san.id, "vm_id": ids[vm["name"]],
                                          "role": role, "size_bytes": size, "backend_handle": f"{vm['name']}-{role}"}
                                         for vm in vms for role, size in (("disk", 1 << 30), ("seed", 1 << 20))])


def timed(call, rounds: int) -> dict[str, float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p95_ms": samples[int(len(samples) * 0.95) - 1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lax-bench-vms-") as scratch:
        url = f"sqlite:///{scratch}/inventory.db"
        migrate(url)
        cfg = config.load(environ={"LAXCLUSTER_DB_URL": url, "LAXCLUSTER_CONFIG": str(config.DEFAULTS)})
        rt = make_runtime(cfg)
        fill(rt, args.vms)
        with transaction(rt.sessions) as session:
            token = create_token(session, "viewer", "bench")
        client = create_app(rt, make_celery(cfg)).test_client()
        headers = {"Authorization": f"Bearer {token}"}
        middle = f"vm-{args.vms // 2:05d}"
        cases = {
            "first_page_100": ("/vms?limit=100", "SELECT * FROM virtual_machines ORDER BY name LIMIT 100", {}),
            "middle_page_100": (f"/vms?limit=100&after={middle}",
                                "SELECT * FROM virtual_machines WHERE name > :after ORDER BY name LIMIT 100", {"after": middle}),
            "page_1000": ("/vms?limit=1000", "SELECT * FROM virtual_machines ORDER BY name LIMIT 1000", {}),
        }
        results = {"vms": args.vms, "rounds": args.rounds, "cases": {}}
        for name, (path, sql, params) in cases.items():
            def api_call(path=path):
                response = client.get(path, headers=headers)
                assert response.status_code == 200, response.get_data(as_text=True)

            def sql_call(sql=sql, params=params):
                with rt.engine.connect() as conn:
                    conn.execute(text(sql), params).all()

            ours, baseline = timed(api_call, args.rounds), timed(sql_call, args.rounds)
            ratio = ours["p50_ms"] / baseline["p50_ms"]
            results["cases"][name] = {"api": ours, "sql": baseline, "ratio_p50": ratio}
            print(f"{name:16} GET /vms p50 {ours['p50_ms']:7.1f} ms (p95 {ours['p95_ms']:7.1f})   "
                  f"plain SQL p50 {baseline['p50_ms']:6.1f} ms   ratio {ratio:5.1f}x")
        rt.engine.dispose()
    first = results["cases"]["first_page_100"]["api"]["p50_ms"]
    results["goals"] = {"first_page_100 p50 <= 5 ms": {"value_ms": first, "met": first <= GOAL_FIRST_PAGE_MS}}
    print(f"goal: first page p50 <= {GOAL_FIRST_PAGE_MS} ms: {first:.1f} ms, "
          f"{'met' if first <= GOAL_FIRST_PAGE_MS else 'not met'}")
    print(f"wrote {write_results('vms.json', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
