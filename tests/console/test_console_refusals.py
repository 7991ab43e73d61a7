"""The console websocket refuses before the upgrade, as problem+json, whoever may not or cannot have it."""

import pytest
import requests

from models import VirtualMachine
from models.db import transaction
from tests.fixtures.console import refused

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


def test_the_console_needs_an_operator_a_known_vm_on_a_server_and_a_websocket(rt, served_api, tokens):
    with transaction(rt.sessions) as session:
        session.add(VirtualMachine(name="idle", memory_bytes=256 << 20, vcpus=1, state="shut off"))
    console = served_api.console_url("idle")

    assert refused(console, None)[1]["code"] == "Unauthorized"
    assert refused(console, "lax_not-a-real-token")[1]["code"] == "Unauthorized"
    status, problem = refused(console, tokens["viewer"])
    assert (status, problem["code"], problem["required_role"]) == (403, "Forbidden", "operator")
    status, problem = refused(served_api.console_url("nosuch"), tokens["operator"])
    assert (status, problem["code"], problem["vm"]) == (404, "VmNotFound", "nosuch")
    status, problem = refused(console, tokens["operator"])
    assert (status, problem["code"], problem["vm"]) == (409, "VmNotRunning", "idle")
    assert refused(served_api.console_url("Not_A_Name"), tokens["operator"])[0] == 422

    plain = requests.get(served_api.url + "/vms/idle/console", headers={"Authorization": f"Bearer {tokens['operator']}"},
                         timeout=10)
    assert (plain.status_code, plain.json()["code"]) == (426, "UpgradeRequired")
    assert "Traceback" not in served_api.log.read_text()
