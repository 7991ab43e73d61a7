"""A real guest on the lab: the `debian` template (Debian 12 by debootstrap, systemd, the real cloud-init,
openssh-server), installed through the API on site-a's VM network with an SSH key, answers SSH from the root
namespace at its leased address and says its name. The template is built once into a cache under /var/tmp
(some minutes the first time) and imported from there like `tiny`."""

import subprocess
import time
from pathlib import Path

import pytest
import requests

from lab.debian import DebianTemplate, build_debian
from lab.processes import wait_until
from models import SUCCEEDED
from tests.fixtures.http import bearer
from tests.fixtures.lab_vms import importable
from tests.fixtures.vms import lease_of, run_job, unique, wait_job
from tests.support import need_binary

pytestmark = [pytest.mark.integration, pytest.mark.lab, pytest.mark.slow]
CACHE = Path("/var/tmp/laxcluster-debian")
SSH_DEADLINE_S = 900
SUBNET = "lab"  # carried by site-a's VM network vm-a, served by DHCP (config/defaults.toml)


@pytest.fixture(scope="session")
def debian() -> DebianTemplate:
    need_binary("debootstrap", "mkfs.ext4")
    return build_debian(CACHE)


def ssh_hostname(key: Path, ip: str) -> str | None:
    """What `ssh root@ip hostname` prints with `key`, None while the guest does not let us in."""
    argv = ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", f"root@{ip}", "hostname"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return done.stdout.strip() if done.returncode == 0 else None


def test_a_debian_vm_answers_ssh_at_its_lease_with_the_injected_key(cluster, celery_app, api_url, tokens, debian,
                                                                   tmp_path):
    rt, name = cluster, unique("deb")
    need_binary("ssh", "ssh-keygen")
    imported = run_job(rt, celery_app, "import-template", {
        "name": "debian", "san": "san-a", "source_path": str(importable(rt, debian.disk)), "format": "raw",
        "os": "debian12", "boot": debian.boot_info()}, timeout=600)
    assert imported.state == SUCCEEDED, imported.error_message
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    body = {"name": name, "template": "debian", "memory": "512M", "vcpus": 1, "disk": "3G", "subnet": SUBNET,
            "ssh_keys": [key.with_suffix(".pub").read_text().strip()]}
    started = time.monotonic()
    answer = requests.post(f"{api_url}/vms", json=body, headers=bearer(tokens["operator"]), timeout=30)
    assert answer.status_code == 202, answer.text
    try:
        installed = wait_job(rt, answer.json()["id"], timeout=600)
        assert installed.state == SUCCEEDED, installed.error_message
        _mac, ip = lease_of(rt, name)
        said = wait_until(lambda: ssh_hostname(key, ip), SSH_DEADLINE_S, f"{name} to answer SSH at {ip}", interval=5)
        assert said == name
        print(f"install -> SSH answers: {time.monotonic() - started:.0f} s")
    finally:
        run_job(rt, celery_app, "delete-vm", {"vm": name})
