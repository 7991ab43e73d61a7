"""Each lab SAN runs an sshd for DR replication: the peer SAN's worker logs in with the replication key,
trusting only the host keys `lab up` wrote to the replication known_hosts file."""

import json
import os
import shlex
from pathlib import Path

import paramiko
import pytest

import config
from lab import cluster, topology
from workers.command import run

pytestmark = pytest.mark.integration


def _login(cfg: config.Config, address: str, known_hosts: Path, key: Path | None = None) -> paramiko.SSHClient:
    """Log in to `address` as the replication settings say, trusting only the hosts in `known_hosts`."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.load_host_keys(str(known_hosts))
    try:
        client.connect(address, port=cfg.replication.port, username=cfg.replication.user,
                       key_filename=str(key or cfg.replication.key_file), allow_agent=False, look_for_keys=False, timeout=10)
    except Exception:
        client.close()  # its transport thread, once a refused handshake began
        raise
    return client


def _output(client: paramiko.SSHClient, argv: list[str]) -> str:
    _stdin, stdout, stderr = client.exec_command(shlex.join(argv), timeout=60)
    text = stdout.read().decode()
    assert stdout.channel.recv_exit_status() == 0, stderr.read().decode()
    return text


def test_a_san_logs_in_to_the_peer_san_host_whose_pool_it_sees_from_that_hosts_namespace(lab: config.Config) -> None:
    _site, san_b = lab.san("san-b")
    pool = san_b.pool_path.resolve()
    code = f"import workers.san.reflink, os; print(os.path.ismount({str(pool)!r})); print(os.readlink('/proc/self/ns/net'))"

    client = _login(lab, config.replication_address(san_b), lab.replication.known_hosts_file)
    try:
        mounted, net_namespace = _output(client, [lab.replication.remote_python, "-c", code]).split()
    finally:
        client.close()

    assert mounted == "True"
    san_b_netns = topology.build(lab).host("san-b").netns
    assert net_namespace == f"net:[{os.stat(f'/run/netns/{san_b_netns}').st_ino}]"


def test_the_known_hosts_file_lists_each_san_once_and_other_keys_are_refused(lab: config.Config, tmp_path: Path) -> None:
    known = lab.replication.known_hosts_file.read_text().splitlines()
    addresses = [config.replication_address(san) for _site, san in lab.sans()]
    assert [line.split()[0] for line in known] == addresses
    san_a_key, san_b_address = known[0].split(maxsplit=1)[1], addresses[1]
    # san-a's genuine host key written down for san-b's address: san-b shows another one.
    swapped = tmp_path / "swapped"
    swapped.write_text(f"{san_b_address} {san_a_key}\n")
    with pytest.raises(paramiko.BadHostKeyException):
        _login(lab, san_b_address, swapped)
    # A host the file does not list at all.
    (tmp_path / "empty").write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        _login(lab, san_b_address, tmp_path / "empty")
    # The right host, but a client key other than the replication key.
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")])
    with pytest.raises(paramiko.AuthenticationException):
        _login(lab, san_b_address, lab.replication.known_hosts_file, key=tmp_path / "stranger")


def test_status_lists_each_sans_sshd_on_its_replication_address_as_state_json_records_it(lab: config.Config) -> None:
    hosts = {h["name"]: h for h in cluster.status(lab)["hosts"]}
    recorded = json.loads((topology.lab_dir(lab) / "state.json").read_text())["sans"]

    for _site, san in lab.sans():
        sshd = [d for d in hosts[san.name]["daemons"] if d["name"] == "sshd"]
        assert len(sshd) == 1 and sshd[0]["answers"]
        assert (sshd[0]["address"], sshd[0]["port"]) == (config.replication_address(san), lab.replication.port)
        assert sshd[0]["pid"] == recorded[san.name]["sshd"]
