"""The classic layout: a volume group on RAID (an md device), a thin pool, thin volumes and thin snapshots.

Every host command is built by a pure function returning an argument list, so the command
lines are testable where device-mapper is missing. Clones are writable thin snapshots that
activate normally; snapshots are read-only thin snapshots that skip activation until read.
Changed ranges come from `thin_delta` on a reserved snapshot of the pool's metadata.

`metadata_only=True` adds `--driverloaded n` (and `--activate n`, `--zero n` on creation) so
the metadata operations can run on a machine without device-mapper; nothing is activated.
"""

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

from errors import ShrinkRefused, VolumeExists, VolumeNotFound
from workers.command import output, run
from workers.san.backend import (
    SECTOR,
    Range,
    VolumeBackend,
    align_and_merge,
    is_snapshot,
    parse_snapshot,
    parse_volume,
    validate_name,
    validate_size,
)

DEFAULT_CHUNK = 64 * 1024
CHANGED_KINDS = ("different", "left_only", "right_only")


def device_mapper_available() -> bool:
    """Whether the kernel has device-mapper (its misc device is registered). /dev/mapper/control
    alone proves nothing: libdevmapper creates that node even where the kernel lacks the driver."""
    with open("/proc/misc") as misc:
        return any(line.split()[-1:] == ["device-mapper"] for line in misc)


def lv_name(handle: str) -> str:
    """The LV a handle lives in: the volume's name, or `<volume>.<snapshot>` for a snapshot."""
    if is_snapshot(handle):
        return ".".join(parse_snapshot(handle))
    return parse_volume(handle)


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives vg/lv (dashes inside a name are doubled)."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def size_arg(size_bytes: int) -> str:
    return f"{size_bytes}b"


def pvcreate_argv(devices: Sequence[str]) -> list[str]:
    return ["pvcreate", "--yes", *devices]


def vgcreate_argv(vg: str, devices: Sequence[str]) -> list[str]:
    return ["vgcreate", "--yes", vg, *devices]


def lvcreate_linear_argv(vg: str, name: str, size_bytes: int) -> list[str]:
    return ["lvcreate", "--yes", "--type", "linear", "--size", size_arg(size_bytes), "--name", name, vg]


def thin_pool_convert_argv(vg: str, pool: str, metadata_lv: str, chunk_bytes: int) -> list[str]:
    """Turn the linear LVs `pool` (data) and `metadata_lv` into a thin pool."""
    return ["lvconvert", "--yes", "--type", "thin-pool", "--chunksize", f"{chunk_bytes // 1024}k",
            "--zero", "n", "--poolmetadata", f"{vg}/{metadata_lv}", f"{vg}/{pool}"]


def lvcreate_thin_argv(vg: str, pool: str, name: str, size_bytes: int) -> list[str]:
    return ["lvcreate", "--yes", "--type", "thin", "--virtualsize", size_arg(size_bytes),
            "--thinpool", f"{vg}/{pool}", "--name", name]


def lvcreate_snapshot_argv(vg: str, origin: str, name: str, *, writable: bool) -> list[str]:
    """A thin snapshot of `origin`: a writable clone that activates normally, or a read-only snapshot
    that skips activation until asked."""
    return ["lvcreate", "--yes", "--snapshot", "--name", name,
            "--setactivationskip", "n" if writable else "y", "--permission", "rw" if writable else "r",
            f"{vg}/{origin}"]


def lvchange_activate_argv(vg: str, lv: str) -> list[str]:
    return ["lvchange", "--activate", "y", "--ignoreactivationskip", f"{vg}/{lv}"]


def lvremove_argv(vg: str, lv: str) -> list[str]:
    return ["lvremove", "--yes", f"{vg}/{lv}"]


def lvresize_argv(vg: str, lv: str, size_bytes: int, *, shrink: bool) -> list[str]:
    command = ["lvreduce", "--yes"] if shrink else ["lvextend"]
    return [*command, "--size", size_arg(size_bytes), f"{vg}/{lv}"]


def lvs_argv(vg: str, fields: Sequence[str]) -> list[str]:
    return ["lvs", "--all", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", ",".join(fields), vg]


def vgs_argv(vg: str) -> list[str]:
    return ["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "vg_name,vg_size,vg_free", vg]


def pool_message_argv(vg: str, pool: str, message: str) -> list[str]:
    """A message to the thin-pool target (reserve/release a metadata snapshot for thin_delta)."""
    return ["dmsetup", "message", f"{dm_name(vg, pool)}-tpool", "0", message]


def thin_delta_argv(vg: str, pool: str, old_id: int, new_id: int) -> list[str]:
    return ["thin_delta", "--metadata-snap", "--thin1", str(old_id), "--thin2", str(new_id),
            f"/dev/mapper/{dm_name(vg, pool)}_tmeta"]


def parse_thin_delta(xml_text: str) -> list[Range]:
    """Byte ranges that differ between the two thin devices in `thin_delta` output (terse or verbose):
    mapped differently, or mapped in only one of them."""
    root = ET.fromstring(xml_text)
    block = int(root.attrib["data_block_size"]) * SECTOR
    ranges = []
    for kind in CHANGED_KINDS:
        for element in root.iter(kind):
            for item in [element, *element.iter("range")]:
                if "begin" in item.attrib:
                    ranges.append((int(item.attrib["begin"]) * block, int(item.attrib["length"]) * block))
    return sorted(ranges)


def option(argv: Sequence[str], flag: str) -> str | None:
    """The value following `flag` in `argv`, if present."""
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def parse_report(text: str, kind: str) -> list[dict[str, str]]:
    """Rows of an `lvs`/`vgs --reportformat json` report."""
    return [row for report in json.loads(text)["report"] for row in report.get(kind, [])]


class LvmThinBackend(VolumeBackend):
    """Thin volumes in thin pool `pool` of volume group `vg`."""

    name = "lvm"

    def __init__(self, vg: str, pool: str = "pool", *, chunk_size: int = DEFAULT_CHUNK,
                 metadata_only: bool = False) -> None:
        self.vg = validate_name(vg)
        self.pool = validate_name(pool)
        self.change_block_size = chunk_size
        self.metadata_only = metadata_only

    def lvm(self, argv: list[str]) -> list[str]:
        """`argv` as this backend runs it: metadata-only flags added when device-mapper is absent."""
        if not self.metadata_only:
            return argv
        extra = ["--driverloaded", "n"]
        if argv[0] == "lvcreate":
            extra += ["--activate", "n"] + (["--zero", "n"] if option(argv, "--type") == "linear" else [])
        return [argv[0], *extra, *argv[1:]]

    def _run(self, argv: list[str]) -> str:
        return run(self.lvm(argv)).stdout.decode()

    # -- the classic layout ----------------------------------------------------

    def create_volume_group(self, devices: Sequence[str]) -> None:
        """pvcreate the devices (an md RAID device in production) and make the volume group on them."""
        self._run(pvcreate_argv(devices))
        self._run(vgcreate_argv(self.vg, devices))

    def pool_layout_argv(self, data_bytes: int, metadata_bytes: int) -> list[list[str]]:
        """The commands that build the thin pool: linear data and metadata LVs, then the conversion."""
        metadata_lv = f"{self.pool}_meta"
        return [
            lvcreate_linear_argv(self.vg, self.pool, data_bytes),
            lvcreate_linear_argv(self.vg, metadata_lv, metadata_bytes),
            thin_pool_convert_argv(self.vg, self.pool, metadata_lv, self.change_block_size),
        ]

    def create_thin_pool(self, data_bytes: int, metadata_bytes: int) -> None:
        for argv in self.pool_layout_argv(data_bytes, metadata_bytes):
            self._run(argv)

    # -- reports -------------------------------------------------------------

    def logical_volumes(self) -> dict[str, dict[str, str]]:
        """Every LV of the group by name, with size (bytes), thin id, pool, origin and attributes."""
        fields = ["lv_name", "lv_size", "thin_id", "pool_lv", "origin", "lv_attr", "segtype"]
        rows = parse_report(self._run(lvs_argv(self.vg, fields)), "lv")
        return {row["lv_name"]: row for row in rows}

    def _lv(self, handle: str) -> dict[str, str]:
        row = self.logical_volumes().get(lv_name(handle))
        if row is None:
            raise VolumeNotFound(f"{handle} does not exist in volume group {self.vg}", handle=handle)
        return row

    # -- the interface -------------------------------------------------------

    def create(self, name: str, size_bytes: int) -> str:
        validate_size(size_bytes)
        self._refuse_existing(validate_name(name))
        self._run(lvcreate_thin_argv(self.vg, self.pool, name, size_bytes))
        return name

    def _refuse_existing(self, lv: str) -> None:
        if lv in self.logical_volumes():
            raise VolumeExists(f"{lv} already exists in volume group {self.vg}", lv=lv)

    def clone(self, source_handle: str, name: str) -> str:
        self._lv(source_handle)
        self._refuse_existing(validate_name(name))
        self._run(lvcreate_snapshot_argv(self.vg, lv_name(source_handle), name, writable=True))
        return name

    def snapshot(self, handle: str, snap_name: str) -> str:
        snap = f"{parse_volume(handle)}@{validate_name(snap_name)}"
        self._lv(handle)
        self._refuse_existing(lv_name(snap))
        self._run(lvcreate_snapshot_argv(self.vg, lv_name(handle), lv_name(snap), writable=False))
        return snap

    def delete(self, handle: str) -> None:
        self._remove(parse_volume(handle))

    def delete_snapshot(self, snap_handle: str) -> None:
        parse_snapshot(snap_handle)
        self._remove(lv_name(snap_handle))

    def _remove(self, lv: str) -> None:
        if lv in self.logical_volumes():
            self._run(lvremove_argv(self.vg, lv))

    def resize(self, handle: str, new_size_bytes: int, *, contents_fit: bool = False) -> None:
        validate_size(new_size_bytes)
        current = int(self._lv(parse_volume(handle))["lv_size"])
        if new_size_bytes == current:
            return
        shrink = new_size_bytes < current
        if shrink and not contents_fit:
            raise ShrinkRefused(f"{handle} is {current} bytes; shrinking to {new_size_bytes} needs the safe shrink",
                                handle=handle, size=current, requested=new_size_bytes)
        self._run(lvresize_argv(self.vg, handle, new_size_bytes, shrink=shrink))

    def size(self, handle: str) -> int:
        return int(self._lv(handle)["lv_size"])

    def exists(self, handle: str) -> bool:
        return lv_name(handle) in self.logical_volumes()

    def changed_ranges(self, old_snap: str, new_handle: str) -> list[Range]:
        parse_snapshot(old_snap)
        old_id, new_id = int(self._lv(old_snap)["thin_id"]), int(self._lv(new_handle)["thin_id"])
        new_size = self.size(new_handle)
        run(pool_message_argv(self.vg, self.pool, "reserve_metadata_snap"))
        try:
            delta = output(thin_delta_argv(self.vg, self.pool, old_id, new_id))
        finally:
            run(pool_message_argv(self.vg, self.pool, "release_metadata_snap"))
        return align_and_merge(parse_thin_delta(delta), self.change_block_size, new_size)

    def path_for_export(self, handle: str) -> str:
        lv = lv_name(handle)
        self._lv(handle)
        if is_snapshot(handle):
            self._run(lvchange_activate_argv(self.vg, lv))
        return f"/dev/{self.vg}/{lv}"

    def facts(self) -> dict[str, Any]:
        group = parse_report(self._run(vgs_argv(self.vg)), "vg")[0]
        pool = self.logical_volumes().get(self.pool, {})
        return {
            "backend": self.name,
            "volume_group": self.vg,
            "thin_pool": self.pool,
            "pool_ready": pool.get("segtype") == "thin-pool",
            "device_mapper": device_mapper_available(),
            "total_bytes": int(group["vg_size"]),
            "free_bytes": int(group["vg_free"]),
            "reflink": False,
            "thin_snapshots": True,
            "fallback": None,
            "change_block_size": self.change_block_size,
        }

    def listing(self) -> dict[str, str]:
        """Thin volumes and snapshots of the pool (`<volume>.<snapshot>` LVs are snapshots); the pool itself
        and LVM's hidden internal LVs are left out."""
        found = {}
        for name, row in self.logical_volumes().items():
            if row.get("pool_lv") != self.pool or name.startswith("["):
                continue
            volume, dot, snap = name.partition(".")
            found[f"{volume}@{snap}" if dot else volume] = f"/dev/{self.vg}/{name}"
        return found
