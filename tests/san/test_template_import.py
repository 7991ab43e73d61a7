"""Template import run in-process (no Celery) on a real DB, a real Redis, qemu-img and a reflink pool on a real XFS:
only regular files of the import directory, formats never probed, no backing files, names nobody chooses."""

import os
import re
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import config
import tasks.san.volumes  # noqa: F401  (registers the import-template job kind)
from config import DEFAULTS
from models import FAILED, SUCCEEDED, Job, Template, Volume
from models.db import transaction
from tasks import jobs
from tasks.inventory.config_sync import sync_from_config
from tasks.runner import execute
from tasks.runtime import Runtime, make_runtime
from tasks.workflow import lookup
from tests.fixtures import factories
from tests.fixtures.san import mounted_filesystem
from tests.support import need_binary, sha256_of, write_at
from workers.command import run as run_command
from workers.san.reflink import ReflinkBackend

MiB = 1 << 20
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Path]:
    yield from mounted_filesystem("xfs", tmp_path)


@pytest.fixture
def srt(pool: Path, db_url: str, redis_port: int, tmp_path: Path) -> Iterator[Runtime]:
    """A runtime whose san-a keeps its volumes on the XFS pool, with the import directory <var>/import."""
    need_binary("qemu-img")
    path = tmp_path / "laxcluster.toml"
    path.write_text(DEFAULTS.read_text().replace('pool_path = "var/lab/san-a/pool"', f'pool_path = "{pool}"'))
    env = {"LAXCLUSTER_DB_URL": db_url, "LAXCLUSTER_REDIS_PORT": str(redis_port),
           "LAXCLUSTER_REDIS_DB": str(int.from_bytes(os.urandom(1), "big") % 15 + 1),
           "LAXCLUSTER_VAR_DIR": str(tmp_path / "var")}
    runtime = make_runtime(config.load(path, environ=env))
    runtime.config.import_dir.mkdir(parents=True)
    with transaction(runtime.sessions) as session:
        sync_from_config(session, runtime.config)
    yield runtime
    runtime.redis.flushdb()
    runtime.redis.close()
    runtime.engine.dispose()


def run(rt: Runtime, params: dict[str, Any]) -> Job:
    """Submit, claim and run an import-template job here as a SAN worker would; return the finished row."""
    with transaction(rt.sessions) as session:
        job, _ = jobs.submit(session, kind="import-template", target=f"template/san-a/{params['name']}",
                             queue="san.site-a", params={"san": "san-a", **params})
    with transaction(rt.sessions) as session:
        claimed = jobs.claim(session, job.id, 0, "test")
    execute(rt, claimed, lookup("import-template"))
    with rt.sessions() as session:
        return session.get(Job, job.id)


def raw_image(path: Path) -> Path:
    path.write_bytes(b"")
    os.truncate(path, 4 * MiB)
    write_at(path, MiB, os.urandom(MiB))
    return path


def qcow2_of(raw: Path, path: Path, *options: str) -> Path:
    run_command(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *options, str(raw), str(path)])
    return path


def templates(rt: Runtime) -> dict[str, str]:
    with rt.sessions() as session:
        return {t.name: t.backend_handle for t in session.scalars(select(Template))}


def template_volumes(pool: Path) -> list[str]:
    return sorted(p.name for p in pool.glob("tpl-*"))


def test_raw_and_qcow2_images_of_the_import_directory_become_templates(srt: Runtime, pool: Path) -> None:
    raw = raw_image(srt.config.import_dir / "base.raw")
    qcow2 = qcow2_of(raw, srt.config.import_dir / "base.qcow2")
    (srt.config.import_dir / "linked.qcow2").symlink_to(qcow2)  # a symlink that stays inside is fine

    jobs_ = [run(srt, {"name": "plain", "source_path": str(raw), "format": "raw"}),
             run(srt, {"name": "packed", "source_path": str(srt.config.import_dir / "linked.qcow2"), "format": "qcow2"})]

    assert [job.state for job in jobs_] == [SUCCEEDED, SUCCEEDED], [job.error_message for job in jobs_]
    handles = templates(srt)
    assert all(re.fullmatch(r"tpl-[0-9a-f]{32}", handle) for handle in handles.values()), handles
    for name in ("plain", "packed"):
        assert sha256_of(pool / f"{handles[name]}.img") == sha256_of(raw)


def test_a_format_is_never_probed(srt: Runtime, pool: Path) -> None:
    raw = raw_image(srt.config.import_dir / "base.raw")
    qcow2 = qcow2_of(raw, srt.config.import_dir / "base.qcow2")
    job = run(srt, {"name": "asis", "source_path": str(qcow2), "format": "raw"})
    assert job.state == SUCCEEDED, job.error_message
    assert sha256_of(pool / f"{templates(srt)['asis']}.img") != sha256_of(raw)  # the qcow2 file's own bytes
    assert (pool / f"{templates(srt)['asis']}.img").read_bytes()[:4] == b"QFI\xfb"


def refusals(images: Path, outside: Path) -> dict[str, tuple[Path, str, str]]:
    """name -> (source path, format, expected error code) of imports that must be refused."""
    secret = raw_image(outside / "secret.raw")
    (images / "escape.raw").symlink_to(secret)
    (images / "escape-dir").symlink_to(outside, target_is_directory=True)
    os.mknod(images / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    os.mkfifo(images / "fifo")
    (images / "subdir").mkdir()
    base = raw_image(images / "base.raw")
    backed = images / "backed.qcow2"
    run_command(["qemu-img", "create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(backed)])
    external = qcow2_of(base, images / "external.qcow2", "-o", f"data_file={outside / 'data.raw'}")
    return {
        "outside": (secret, "raw", "ImportSourceRefused"),
        "device-outside": (Path("/dev/zero"), "raw", "ImportSourceRefused"),
        "symlink-out": (images / "escape.raw", "raw", "ImportSourceRefused"),
        "dir-symlink-out": (images / "escape-dir" / "secret.raw", "raw", "ImportSourceRefused"),
        "dotdot": (Path(f"{images}/../outside/secret.raw"), "raw", "ImportSourceRefused"),
        "device": (images / "zero", "raw", "ImportSourceRefused"),
        "fifo": (images / "fifo", "raw", "ImportSourceRefused"),
        "directory": (images / "subdir", "raw", "ImportSourceRefused"),
        "missing": (images / "nothing.raw", "raw", "ImportSourceRefused"),
        "backing-file": (backed, "qcow2", "BackingFileRefused"),
        "data-file": (external, "qcow2", "BackingFileRefused"),
    }


def test_anything_but_a_self_contained_regular_file_in_the_import_directory_is_refused(
        srt: Runtime, pool: Path, tmp_path: Path) -> None:
    outside = tmp_path / "var" / "outside"
    outside.mkdir()
    cases = refusals(srt.config.import_dir, outside)

    ended = {case: run(srt, {"name": case, "source_path": str(source), "format": fmt})
             for case, (source, fmt, _) in cases.items()}

    assert {case: (job.state, job.error_code) for case, job in ended.items()} == {
        case: (FAILED, code) for case, (_, _, code) in cases.items()}
    assert templates(srt) == {} and template_volumes(pool) == []


def broken_qcow2(images: Path) -> Path:
    """A qcow2 whose header reads fine and whose conversion then fails, after the volume was made."""
    image = qcow2_of(raw_image(images / "good.raw"), images / "broken.qcow2")
    with image.open("r+b") as data:
        l1_offset = struct.unpack(">Q", data.read(48)[40:48])[0]
        data.seek(l1_offset)
        data.write(struct.pack(">Q", 0x8000000000000201))  # an unaligned L2 table
    return image


def test_an_import_touches_no_volume_but_its_own_whatever_the_names(srt: Runtime, pool: Path) -> None:
    # `tpl-<template>` was the old volume name: template `web1-disk` would have landed on VM tpl-web1's disk.
    with transaction(srt.sessions) as session:
        factories.vm(session, "tpl-web1", disk_bytes=4 * MiB)
    ReflinkBackend(str(pool)).create("tpl-web1-disk", 4 * MiB)
    disk = pool / "tpl-web1-disk.img"
    write_at(disk, 0, os.urandom(MiB))
    before = sha256_of(disk)

    failed = run(srt, {"name": "web1-disk", "source_path": str(broken_qcow2(srt.config.import_dir)), "format": "qcow2"})
    assert (failed.state, failed.error_code) == (FAILED, "CommandFailed")
    assert sha256_of(disk) == before and template_volumes(pool) == ["tpl-web1-disk.img"]

    good = raw_image(srt.config.import_dir / "web.raw")
    imported = run(srt, {"name": "web1-disk", "source_path": str(good), "format": "raw"})
    assert imported.state == SUCCEEDED, imported.error_message
    assert sha256_of(disk) == before
    handle = templates(srt)["web1-disk"]
    assert handle != "tpl-web1-disk" and sha256_of(pool / f"{handle}.img") == sha256_of(good)
    with srt.sessions() as session:
        assert session.scalar(select(Volume.backend_handle).where(Volume.name == "tpl-web1-disk")) == "tpl-web1-disk"
