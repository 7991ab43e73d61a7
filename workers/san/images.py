"""Disk images into volumes: a raw or qcow2 file (a template image, a seed) written into a backend volume."""

import json
from pathlib import Path

from workers.command import output, run
from workers.san.backend import SECTOR, VolumeBackend


def write_image(backend: VolumeBackend, name: str, source: Path) -> str:
    """Create volume `name` (or reuse it) holding the raw or qcow2 image `source`, converted by qemu-img;
    return its handle. The volume is the image's virtual size rounded up to whole sectors."""
    info = json.loads(output(["qemu-img", "info", "--output=json", str(source)]))
    size = -(-int(info["virtual-size"]) // SECTOR) * SECTOR
    handle = name if backend.exists(name) else backend.create(name, size)
    run(["qemu-img", "convert", "-n", "-f", info["format"], "-O", "raw", str(source), backend.path_for_export(handle)])
    return handle
