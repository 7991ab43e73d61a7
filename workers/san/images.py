"""Disk images into volumes: a raw or qcow2 file (a template image, a seed) written into a backend volume.

The image's format is always given, never probed: a file that merely looks like qcow2 is read as
what the caller said it is. An image that names another file to read (a qcow2 backing file or an
external data file) is refused, so qemu-img reads exactly the one file it was given. Template
images come only from the import directory: `open_importable` resolves every symlink and opens
the file before checking it, and qemu-img reads that very open file, so the file cannot be swapped
after the check.
"""

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from errors import BackingFileRefused, ImportSourceRefused
from workers.command import output, run
from workers.san.backend import SECTOR, VolumeBackend

ImageFormat = Literal["raw", "qcow2"]


def write_image(backend: VolumeBackend, name: str, source: Path, fmt: ImageFormat) -> str:
    """Create volume `name` (or reuse it) holding the `fmt` image `source`, converted by qemu-img; return its
    handle. The volume is the image's virtual size rounded up to whole sectors. BackingFileRefused if the
    image would make qemu-img read another file."""
    info = json.loads(output(["qemu-img", "info", "--output=json", "-f", fmt, str(source)]))
    refuse_other_files(info)
    size = -(-int(info["virtual-size"]) // SECTOR) * SECTOR
    handle = name if backend.exists(name) else backend.create(name, size)
    run(["qemu-img", "convert", "-n", "-f", fmt, "-O", "raw", str(source), backend.path_for_export(handle)])
    return handle


def refuse_other_files(info: dict) -> None:
    """BackingFileRefused if `qemu-img info` shows the image naming a backing file or an external data file."""
    named = info.get("backing-filename") or info.get("format-specific", {}).get("data", {}).get("data-file")
    if named:
        raise BackingFileRefused(f"the image names another file to read ({named}): make it self-contained first "
                                 "(qemu-img convert -O qcow2, without -B)", field="source_path", names=named)


@contextmanager
def open_importable(import_dir: Path, source: Path) -> Iterator[Path]:
    """Open `source` if it is a regular file inside `import_dir` once every symlink in either is resolved,
    and yield a path that names that open file (/proc/self/fd/N: the check and the read see one file).
    ImportSourceRefused for anything else: a path outside, a symlink leading out, a device, a FIFO, a directory."""
    root = os.path.realpath(import_dir)
    try:
        fd = os.open(os.path.realpath(source), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise refused(source, import_dir, f"cannot be opened ({exc.strerror})") from None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.commonpath([root, real]) != root or real == root:
            raise refused(source, import_dir, f"is {real}, outside the import directory")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refused(source, import_dir, "is not a regular file")
        yield Path(f"/proc/{os.getpid()}/fd/{fd}")
    finally:
        os.close(fd)


def refused(source: Path, import_dir: Path, why: str) -> ImportSourceRefused:
    return ImportSourceRefused(f"image {source} {why}: templates are imported only from regular files in "
                               f"{import_dir} on the SAN host", field="source_path", source=str(source))
