"""`laxcluster vm|subnet|template|volume|san` against the API served for real (waitress)."""

import json

from click.testing import CliRunner
from sqlalchemy import select, update

from cli.main import cli
from models import Job, San, VirtualMachine, Volume
from models.db import transaction
from tasks.queues import CONTROL
from tests.fixtures import factories

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEJQujcdYiCL ops@example"


def as_admin(api_url, tokens, *args):
    return CliRunner().invoke(cli, ["--url", api_url, "--token", tokens["admin"], *args], catch_exceptions=False)


def ok(result):
    assert result.exit_code == 0, result.output
    return result.stdout


def row_of(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if f" {name} " in line)


def test_subnet_create_and_list(api_url, tokens):
    created = ok(as_admin(api_url, tokens, "subnet", "create", "lan", "--cidr", "10.40.0.0/24", "--gateway", "10.40.0.1",
                          "--range", "10.40.0.10-10.40.0.20", "--dns", "10.40.0.2", "--dns", "10.40.0.3"))
    assert "subnet lan: 10.40.0.0/24, leases 10.40.0.10-10.40.0.20" in created
    row = row_of(ok(as_admin(api_url, tokens, "subnet", "list")), "lan")
    assert "10.40.0.10-10.40.0.20" in row and "10.40.0.2, 10.40.0.3" in row and "52:54:00" in row
    bad = as_admin(api_url, tokens, "subnet", "create", "wan", "--cidr", "10.41.0.0/24", "--range", "10.41.0.10")
    assert bad.exit_code == 2 and "START-END" in bad.output
    outside = as_admin(api_url, tokens, "subnet", "create", "wan", "--cidr", "10.41.0.0/24", "--range", "10.9.0.1-10.9.0.2")
    assert outside.exit_code == 1 and outside.stderr.startswith("InvalidInput: ")


def test_vm_install_list_show_and_delete(rt, api_url, tokens, tmp_path):
    with transaction(rt.sessions) as session:
        factories.template(session)
        factories.subnet(session)
    keys = tmp_path / "id_ed25519.pub"
    keys.write_text(f"# my laptop\n{KEY}\n\n")
    installed = ok(as_admin(api_url, tokens, "vm", "install", "web1", "--template", "tiny", "--memory", "256M",
                            "--vcpus", "1", "--disk", "1G", "--subnet", "lan", "--ssh-key", str(keys),
                            "--description", "front door"))
    assert installed.startswith("job ") and "queued (install-vm vm/web1)" in installed
    with rt.sessions() as session:
        assert session.scalar(select(VirtualMachine.ssh_keys).where(VirtualMachine.name == "web1")) == [KEY]
    with transaction(rt.sessions) as session:
        factories.vm(session, "db1", server="cs1", state="running", domain_id=7, cpu_time_ns=12_500_000_000)
    overview = ok(as_admin(api_url, tokens, "vm", "list"))
    active, inactive = overview.split("Inactive")
    assert "db1" in active and "web1" not in active
    db1 = row_of(active, "db1")
    assert " cs1 " in db1 and " 7 " in db1 and "12.5s" in db1 and "256.0 MiB" in db1
    web1 = row_of(inactive, "web1")
    assert "installing" in web1 and "10.40.0.10" in web1 and "tiny" in web1 and "front door" in web1
    listed = json.loads(ok(as_admin(api_url, tokens, "vm", "list", "--json")))
    assert [vm["name"] for vm in listed["active"]] == ["db1"] and [vm["name"] for vm in listed["inactive"]] == ["web1"]
    shown = ok(as_admin(api_url, tokens, "vm", "show", "web1"))
    assert "ip:" in shown and "10.40.0.10" in shown and "volumes:" in shown
    refused = as_admin(api_url, tokens, "vm", "install", "web2", "--template", "tiny", "--memory", "256",
                       "--vcpus", "1", "--disk", "1G")
    assert refused.exit_code == 1 and refused.stderr.startswith("InvalidInput: memory: ")
    missing = as_admin(api_url, tokens, "vm", "show", "ghost")
    assert missing.exit_code == 1 and missing.stderr.startswith("VmNotFound: ")


def test_vm_power_actions_and_delete_make_jobs(rt, api_url, tokens):
    with transaction(rt.sessions) as session:
        factories.vm(session, "web1", server="cs1", state="running")
    rebooting = ok(as_admin(api_url, tokens, "vm", "reboot", "web1"))
    assert "queued (reboot vm/web1)" in rebooting
    busy = as_admin(api_url, tokens, "vm", "destroy", "web1")
    assert busy.exit_code == 1 and busy.stderr.startswith("TargetBusy: ")
    ok(as_admin(api_url, tokens, "jobs", "cancel", rebooting.split()[1].rstrip(":")))
    deleted = ok(as_admin(api_url, tokens, "vm", "delete", "web1"))
    assert "queued (delete-vm vm/web1)" in deleted


def test_vm_start_watch_exits_1_with_the_jobs_error(rt, api_url, tokens, celery_worker):
    with transaction(rt.sessions) as session:
        factories.vm(session, "web1")  # never placed: the start workflow itself refuses
    celery_worker([CONTROL], concurrency=1)
    result = as_admin(api_url, tokens, "vm", "start", "web1", "--watch")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("VmNotPlaced: ")


def test_templates_volumes_and_sans(rt, api_url, tokens, monkeypatch):
    with transaction(rt.sessions) as session:
        factories.template(session, "tiny", boot={"kernel": "/srv/vmlinuz"})
        factories.vm(session, "web1", disk_bytes=1 << 30)
        session.execute(update(San).where(San.name == "san-a").values(
            facts={"total_bytes": 20 << 30, "free_bytes": 15 << 30, "reflink": True}))
        volume_id = session.scalar(select(Volume.id))
    assert "direct" in row_of(ok(as_admin(api_url, tokens, "template", "list")), "tiny")
    rt.config.import_dir.mkdir(parents=True)
    monkeypatch.chdir(rt.config.import_dir)
    imported = ok(as_admin(api_url, tokens, "template", "import", "alpine", "images/alpine.qcow2", "--san", "san-a"))
    assert "queued (import-template template/san-a/alpine)" in imported
    with rt.sessions() as session:
        job = session.scalar(select(Job).where(Job.kind == "import-template"))
    assert (job.params["source_path"], job.params["format"]) == (str(rt.config.import_dir / "images" / "alpine.qcow2"),
                                                                 "qcow2")
    san_a = row_of(ok(as_admin(api_url, tokens, "san", "list")), "san-a")
    assert "20.0 GiB" in san_a and "5.0 GiB" in san_a and "15.0 GiB" in san_a and " yes " in san_a
    assert "web1-disk" in ok(as_admin(api_url, tokens, "san", "volumes", "san-a"))
    assert "web1-disk" in ok(as_admin(api_url, tokens, "volume", "show", str(volume_id)))
    resized = ok(as_admin(api_url, tokens, "volume", "resize", str(volume_id), "2G"))
    assert "queued (resize-volume vm/web1)" in resized
    unitless = as_admin(api_url, tokens, "volume", "resize", str(volume_id), "2048")
    assert unitless.exit_code == 1 and unitless.stderr.startswith("InvalidInput: size: ")


def test_vm_disk_add_list_and_remove(rt, api_url, tokens):
    with transaction(rt.sessions) as session:
        vm = factories.vm(session, "web1", disk_bytes=1 << 30)
        san_id = session.scalar(select(San.id).where(San.name == "san-a"))
        data = Volume(name="web1-data", san_id=san_id, vm_id=vm.id, role="data", size_bytes=2 << 30,
                      backend_handle="web1-data", iscsi_lun=3, label="pgdata")
        session.add(data)
        session.flush()
        data_id, boot_id = data.id, session.scalar(select(Volume.id).where(Volume.name == "web1-disk"))
    listed = ok(as_admin(api_url, tokens, "vm", "disk", "list", "web1"))
    assert "pgdata" in row_of(listed, str(data_id)) and "2.0 GiB" in listed
    added = ok(as_admin(api_url, tokens, "vm", "disk", "add", "web1", "--size", "1G", "--label", "logs"))
    assert "queued (add-disk vm/web1)" in added
    ok(as_admin(api_url, tokens, "jobs", "cancel", added.split()[1].rstrip(":")))
    refused = as_admin(api_url, tokens, "vm", "disk", "remove", "web1", str(boot_id))
    assert refused.exit_code == 1 and refused.stderr.startswith("BootDiskNotRemovable: ")
    removed = ok(as_admin(api_url, tokens, "vm", "disk", "remove", "web1", str(data_id)))
    assert "queued (remove-disk vm/web1)" in removed
