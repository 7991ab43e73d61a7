"""Where a file holds data: its non-hole segments, found with SEEK_DATA/SEEK_HOLE, so holes are never read."""

import errno
import os
from collections.abc import Iterator

from workers.san.backend import Range


def data_segments(fd: int, size: int | None = None) -> Iterator[Range]:
    """The data (non-hole) segments of `fd` below `size`, the last one cut at `size`.

    `size` defaults to the file's size; give it for a block device (whose st_size is 0) or to
    read only the start of a file."""
    end_of_walk = os.fstat(fd).st_size if size is None else size
    offset = 0
    while offset < end_of_walk:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if start >= end_of_walk:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), end_of_walk)
        yield start, end - start
        offset = end
