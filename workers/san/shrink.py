"""Safe shrink of a stopped volume: shrink the filesystem first, then the partition, then the volume.

Understood content: ext2/3/4 on the whole volume, or an MBR (dos) or GPT partition table
whose last partition holds ext2/3/4. Anything else is refused with UnknownFilesystem;
a size the data would not fit in is refused with DataWouldNotFit (stating the minimum),
before anything is changed. The caller makes sure no VM uses the volume.
"""

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from errors import CommandFailed, DataWouldNotFit, FilesystemDamaged, InvalidSize, UnknownFilesystem
from workers.command import output, run
from workers.san.backend import (
    SECTOR,
    VolumeBackend,
    validate_size,
)

EXT_TYPES = {"ext2", "ext3", "ext4"}
DOS_EXTENDED_TYPES = {"5", "f", "85"}
E2FSCK_CLEAN_OR_FIXED = {0, 1, 2}


@dataclass(frozen=True)
class Layout:
    """Where the ext filesystem lives: the whole volume (`table` None) or partition `node` of a table;
    `tail` is what the table keeps at the end of the disk (GPT's backup)."""

    fstype: str
    offset: int
    length: int
    table: str | None = None
    node: str | None = None
    tail: int = 0


@dataclass(frozen=True)
class ShrinkResult:
    old_size: int
    new_size: int
    filesystem_bytes: int
    minimum_bytes: int
    layout: Layout


def probe(path: str, offset: int = 0) -> dict[str, str]:
    """blkid's low-level probe of `path` at byte `offset` (empty when it recognises nothing)."""
    proc = run(["blkid", "-p", "-o", "export", "-O", str(offset), path], check=False)
    if proc.returncode not in (0, 2):
        raise CommandFailed(f"blkid exited {proc.returncode}: {proc.stderr.decode(errors='replace')}", argv=proc.args)
    return dict(line.split("=", 1) for line in proc.stdout.decode().splitlines() if "=" in line)


def detect_layout(path: str, size: int) -> Layout:
    """Find the ext filesystem a shrink would work on in the `size`-byte file or device at `path`;
    raise UnknownFilesystem for anything else."""
    found = probe(path)
    if found.get("TYPE") in EXT_TYPES:
        return Layout(found["TYPE"], 0, size)
    if found.get("PTTYPE") in ("gpt", "dos"):
        return partition_layout(path, found["PTTYPE"], size)
    what = found.get("TYPE") or found.get("PTTYPE") or "no recognisable filesystem"
    raise UnknownFilesystem(f"cannot shrink {os.path.basename(path)}: it holds {what}, not ext2/3/4", found=what)


def partition_layout(path: str, table: str, size: int) -> Layout:
    described = json.loads(output(["sfdisk", "--json", path]))["partitiontable"]
    partitions = described.get("partitions", [])
    tail = size - (described["lastlba"] + 1) * SECTOR if "lastlba" in described else 0
    if not partitions:
        raise UnknownFilesystem("the partition table has no partitions", table=table)
    if table == "dos" and any(p["type"].lower() in DOS_EXTENDED_TYPES for p in partitions):
        raise UnknownFilesystem("MBR tables with extended/logical partitions are not shrunk", table=table)
    last = max(partitions, key=lambda p: p["start"] + p["size"])
    offset, length = last["start"] * SECTOR, last["size"] * SECTOR
    fstype = probe(path, offset).get("TYPE")
    if fstype not in EXT_TYPES:
        raise UnknownFilesystem(f"the last partition holds {fstype or 'nothing recognisable'}, not ext2/3/4",
                                table=table, found=fstype)
    return Layout(fstype, offset, length, table, last["node"], tail)


@contextmanager
def filesystem_device(path: str, layout: Layout) -> Iterator[str]:
    """A path e2fsck/resize2fs can work on: the file itself, or a loop device over the partition."""
    if layout.table is None:
        yield path
        return
    device = output(["losetup", "--find", "--show", "--offset", str(layout.offset),
                     "--sizelimit", str(layout.length), path]).strip()
    try:
        yield device
    finally:
        run(["losetup", "--detach", device], check=False)


def check_filesystem(device: str) -> None:
    """Force a full e2fsck, repairing what it can; raise FilesystemDamaged if it cannot."""
    proc = run(["e2fsck", "-f", "-y", device], check=False)
    if proc.returncode not in E2FSCK_CLEAN_OR_FIXED:
        raise FilesystemDamaged(f"e2fsck exited {proc.returncode}: {proc.stdout.decode(errors='replace')[-2000:]}",
                                returncode=proc.returncode)


def block_size(device: str) -> int:
    match = re.search(r"^Block size:\s+(\d+)", output(["dumpe2fs", "-h", device]), re.MULTILINE)
    if not match:
        raise CommandFailed(f"dumpe2fs did not report the block size of {device}")
    return int(match[1])


def minimum_blocks(device: str) -> int:
    match = re.search(r"minimum size of the filesystem:\s*(\d+)", output(["resize2fs", "-P", device]))
    if not match:
        raise CommandFailed(f"resize2fs -P did not report a minimum size for {device}")
    return int(match[1])


def filesystem_room(layout: Layout, new_size: int) -> int:
    """Bytes the filesystem may occupy once the volume is `new_size` bytes (never more than it has now)."""
    return max(min(new_size - layout.tail - layout.offset, layout.length), 0)


def rewrite_partition_table(path: str, layout: Layout, fs_bytes: int) -> None:
    """Rewrite the table for the (already truncated) file with the last partition `fs_bytes` long;
    sfdisk recomputes the GPT's last usable LBA, backup header and protective MBR."""
    lines = []
    for line in output(["sfdisk", "--dump", path]).splitlines():
        if line.startswith(("last-lba:", "device:")):
            continue
        if line.startswith(f"{layout.node} :"):
            line = re.sub(r"size=\s*\d+", f"size={fs_bytes // SECTOR}", line, count=1)
        lines.append(line)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", path], input="\n".join(lines).encode() + b"\n")


def require_fit(device: str, layout: Layout, room_blocks: int, fs_block: int, handle: str, new_size: int) -> int:
    """The smallest volume size the filesystem fits in; raise DataWouldNotFit if `room_blocks` is less."""
    needed_blocks = minimum_blocks(device)
    minimum = needed_blocks * fs_block + layout.offset + layout.tail
    if room_blocks < needed_blocks:
        raise DataWouldNotFit(f"{handle} needs at least {minimum} bytes; {new_size} is too small",
                              minimum_bytes=minimum, requested=new_size)
    return minimum


def safe_shrink(backend: VolumeBackend, handle: str, new_size: int) -> ShrinkResult:
    """Shrink a stopped volume to `new_size` bytes without losing data: e2fsck, resize2fs, partition
    table, then the volume. Raises UnknownFilesystem or DataWouldNotFit (with `minimum_bytes`)
    before changing anything when it cannot be done."""
    validate_size(new_size)
    old_size = backend.size(handle)
    if new_size > old_size:
        raise InvalidSize(f"{new_size} is larger than the volume ({old_size}); grow with resize", size=new_size)
    path = backend.path_for_export(handle)
    layout = detect_layout(path, old_size)
    with filesystem_device(path, layout) as device:
        fs_block = block_size(device)
        room_blocks = filesystem_room(layout, new_size) // fs_block
        # Estimate before e2fsck too, so an obvious refusal leaves the volume untouched
        # (e2fsck writes its check time), and again after it, on the repaired filesystem.
        require_fit(device, layout, room_blocks, fs_block, handle, new_size)
        check_filesystem(device)
        minimum = require_fit(device, layout, room_blocks, fs_block, handle, new_size)
        run(["resize2fs", device, str(room_blocks)])
        verify_clean(device)
    backend.resize(handle, new_size, contents_fit=True)
    if layout.table is not None:
        rewrite_partition_table(path, layout, room_blocks * fs_block)
    return ShrinkResult(old_size, new_size, room_blocks * fs_block, minimum, layout)


def verify_clean(device: str) -> None:
    """Read-only e2fsck after the resize: the volume is only cut if this passes."""
    proc = run(["e2fsck", "-f", "-n", device], check=False)
    if proc.returncode != 0:
        raise FilesystemDamaged(f"e2fsck after resize2fs exited {proc.returncode}", returncode=proc.returncode)
