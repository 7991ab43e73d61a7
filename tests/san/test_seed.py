"""NoCloud seed images: a VFAT volume labelled CIDATA with the three standard files, written into a SAN volume."""

import subprocess
from pathlib import Path

import pytest

from errors import InvalidInput
from tests.support import need_binary
from workers.san.reflink import ReflinkBackend
from workers.san.seed import make_seed, write_seed

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMkDnq0lN0sX2m0Z1Wb0hQ operator@laptop"


@pytest.fixture(autouse=True)
def _tools() -> None:
    need_binary("mkfs.vfat", "mcopy", "mtype", "blkid", "qemu-img")


def seed_file(image: Path, name: str) -> str:
    return subprocess.run(["mtype", "-i", str(image), f"::{name}"], capture_output=True, text=True, check=True).stdout


def test_seed_is_a_cidata_vfat_volume_with_hostname_network_and_keys(tmp_path: Path) -> None:
    image = make_seed(
        tmp_path / "seed.img", hostname="web1", mac="52:54:00:AB:cd:01", ip_cidr="10.20.0.5/24", gateway="10.20.0.1", ssh_keys=[KEY],
        dns=["10.20.0.1", "9.9.9.9"],
    )
    blkid = subprocess.run(["blkid", "-o", "export", str(image)], capture_output=True, text=True, check=True).stdout
    assert "TYPE=vfat" in blkid and "LABEL=CIDATA" in blkid
    assert "local-hostname: web1" in seed_file(image, "meta-data").splitlines()
    network = seed_file(image, "network-config")
    assert network.startswith("version: 1\n")
    assert '    mac_address: "52:54:00:ab:cd:01"' in network.splitlines()
    assert "        address: 10.20.0.5/24" in network.splitlines()
    assert "        gateway: 10.20.0.1" in network.splitlines()
    assert "        dns_nameservers: [10.20.0.1, 9.9.9.9]" in network.splitlines()
    user = seed_file(image, "user-data")
    assert user.startswith("#cloud-config\n")
    assert f'  - "{KEY}"' in user.splitlines()


def test_seed_without_address_asks_for_dhcp_and_without_keys_lists_none(tmp_path: Path) -> None:
    image = make_seed(tmp_path / "seed.img", hostname="db2", mac=None, ip_cidr=None, gateway=None, ssh_keys=[])
    assert "type: dhcp" in seed_file(image, "network-config")
    assert "mac_address" not in seed_file(image, "network-config")
    assert "ssh_authorized_keys" not in seed_file(image, "user-data")


def test_making_a_seed_again_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "seed.img"
    make_seed(path, hostname="one", mac=None, ip_cidr=None, gateway=None, ssh_keys=[])
    make_seed(path, hostname="two", mac=None, ip_cidr=None, gateway=None, ssh_keys=[])
    assert "local-hostname: two" in seed_file(path, "meta-data")
    assert [p.name for p in tmp_path.iterdir()] == ["seed.img"]


def test_a_seed_is_written_into_a_volume_again_and_again(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    backend = ReflinkBackend(str(pool))
    handle = write_seed(backend, "web1-seed", hostname="web1", mac=None, ip_cidr=None, gateway=None, ssh_keys=[KEY])
    assert handle == "web1-seed" and backend.size(handle) == 1024 * 1024
    volume = Path(backend.path_for_export(handle))
    assert "local-hostname: web1" in seed_file(volume, "meta-data")
    write_seed(backend, "web1-seed", hostname="web1", mac=None, ip_cidr="10.0.0.5/24", gateway=None, ssh_keys=[])
    assert "address: 10.0.0.5/24" in seed_file(volume, "network-config")
    assert sorted(p.name for p in pool.iterdir()) == ["web1-seed.img"]


@pytest.mark.parametrize(
    "bad",
    [
        {"hostname": "Web_1"},
        {"hostname": "-web"},
        {"mac": "52:54:00:zz:00:01"},
        {"ip_cidr": "10.0.0.300/24"},
        {"ip_cidr": "10.0.0.5"},
        {"gateway": "gateway"},
        {"dns": ["10.0.0.1; rm -rf /"]},
        {"ssh_keys": ['ssh-ed25519 AAAA x"\nrm -rf /']},
        {"ssh_keys": ["not a key"]},
    ],
)
def test_bad_values_are_refused_and_nothing_is_written(tmp_path: Path, bad: dict[str, object]) -> None:
    values: dict[str, object] = {"hostname": "web1", "mac": None, "ip_cidr": "10.0.0.5/24", "gateway": None, "ssh_keys": []}
    values.update(bad)
    with pytest.raises(InvalidInput):
        make_seed(tmp_path / "seed.img", **values)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
