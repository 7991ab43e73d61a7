"""Clone time of the reflink volume backend beside a real full copy (issue 4, "Benchmark").

Makes its own XFS (reflink=1) in a sparse image under a temporary directory, loop-mounts
it, fills two templates with data (no holes), and measures in one run:

- `ReflinkBackend.clone` of the small and the large template, median of 5 (each clone
  deleted after it is timed), exactly as the SAN worker clones a template;
- a full copy of the large template: `cp --reflink=never --sparse=never` then
  `sync -f` of the pool filesystem (coreutils 9 `cp` reflinks by default and copies nothing).

Prints both figures with the ratios, writes `bench/results/clone.json` (`--small`:
`clone-small.json`, 64 MiB and 1 GiB templates), and removes everything it made
(mount, loop device, image) also on failure, Ctrl-C or SIGTERM.

Run as root: `.venv/bin/python bench/clone.py [--small]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchkit import exit_on_sigterm, require_root_and, run_to_end, write_results
from lab import pool
from workers.san.reflink import ReflinkBackend, fiemap

MIB = 1 << 20
GIB = 1 << 30
BLOCK = 4096
FILL_CHUNK = 64 * MIB
RUNS = 5
RATIO_GOAL = 1.1
NOISE_FLOOR_S = 0.010  # below this a clone's duration is scheduling noise, not work
SPEEDUP_GOAL = 50
SPACE_MARGIN = GIB  # XFS log and metadata written into the sparse image
TEXT_BLOCK = (b"LaxCluster template block: compressible filler text. " * 80)[:BLOCK]


@dataclass(frozen=True)
class Plan:
    """Template sizes of one run and where its results go."""

    small: int
    large: int
    results_file: str

    @property
    def data_bytes(self) -> int:
        """Bytes the run writes: both templates and the full copy of the large one."""
        return self.small + 2 * self.large

    @property
    def image_bytes(self) -> int:
        """Size of the sparse image: the data plus a fifth for XFS, in whole GiB."""
        return -(-self.data_bytes * 6 // 5 // GIB) * GIB


FULL = Plan(small=1 * GIB, large=16 * GIB, results_file="clone.json")
SMALL = Plan(small=64 * MIB, large=1 * GIB, results_file="clone-small.json")


def label(size: int) -> str:
    """`1g`, `16g`, `64m`: the size as used in result keys."""
    return f"{size // GIB}g" if size % GIB == 0 else f"{size // MIB}m"


def human(size: int) -> str:
    return f"{size // GIB} GiB" if size % GIB == 0 else f"{size // MIB} MiB"


def check_free_space(directory: str, needed: int) -> int:
    """Free bytes of the filesystem holding `directory`; exit with a clear message if fewer than `needed`."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if free < needed:
        raise SystemExit(
            f"not enough free space in {directory}: the benchmark writes {needed / GIB:.1f} GiB "
            f"into its sparse image, the filesystem has {free / GIB:.1f} GiB free. "
            "Free some space, point TMPDIR at a bigger filesystem, or run with --small."
        )
    return free




@contextmanager
def scratch_pool(plan: Plan) -> Iterator[Path]:
    """A fresh XFS (reflink=1) on a sparse image in a new temporary directory, loop-mounted; yields its mount point.

    Unmounts, detaches the loop device and deletes the directory whatever happens inside,
    with Ctrl-C ignored while it cleans up so an impatient second Ctrl-C cannot leave a mount behind."""
    workdir = Path(tempfile.mkdtemp(prefix="laxcluster-bench-clone-"))
    image, mountpoint = workdir / "pool.img", workdir / "pool"
    try:
        pool.ensure(image, plan.image_bytes, mountpoint)
        yield mountpoint
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            remove_scratch(workdir, image, mountpoint)
        finally:
            signal.signal(signal.SIGINT, previous)


def remove_scratch(workdir: Path, image: Path, mountpoint: Path) -> None:
    """Unmount and detach; delete `workdir` only once nothing is mounted from it (else say what is left)."""
    try:
        pool.teardown(image, mountpoint)
    except Exception as exc:  # noqa: BLE001 - report, never hide what is left behind
        print(f"cleanup failed ({exc}); left behind: mount {mountpoint}, image {image}. "
              f"Remove with: umount {mountpoint}; losetup -j {image}; losetup -d <dev>; rm -r {workdir}",
              file=sys.stderr)
        return
    shutil.rmtree(workdir)


def fill_pattern() -> bytearray:
    """A FILL_CHUNK buffer of alternating random and compressible 4 KiB blocks, each carrying its
    block number at bytes 8-15 so no two blocks of a chunk are equal."""
    pattern = bytearray(os.urandom(FILL_CHUNK))
    for index in range(FILL_CHUNK // BLOCK):
        start = index * BLOCK
        if index % 2:
            pattern[start:start + BLOCK] = TEXT_BLOCK
        pattern[start + 8:start + 16] = index.to_bytes(8, "little")
    return pattern


def stamp_chunk(pattern: bytearray, chunk: int) -> None:
    """Write `chunk` into bytes 0-7 of every block of `pattern`, so each chunk of a file differs from the others."""
    blocks = len(pattern) // BLOCK
    for byte, value in enumerate(chunk.to_bytes(8, "little")):
        pattern[byte::BLOCK] = bytes([value]) * blocks


def fill(path: str, size: int, pattern: bytearray) -> None:
    """Write data over every byte of the file at `path` (leaving no hole) and fsync it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for chunk, offset in enumerate(range(0, size, FILL_CHUNK)):
            stamp_chunk(pattern, chunk)
            os.pwrite(fd, memoryview(pattern)[:min(FILL_CHUNK, size - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Template:
    """A filled template volume and what the filesystem made of it."""

    handle: str
    size: int
    fill_s: float
    allocated_bytes: int
    extents: int  # a reflink clone's cost grows with the extent count, not with the size


def make_template(backend: ReflinkBackend, size: int, pattern: bytearray) -> Template:
    """Create a template volume of `size` bytes filled with data.
    Refuses to go on if the filesystem left part of it unallocated (a sparse template would flatter the copy)."""
    handle = backend.create(f"template-{label(size)}", size)
    path = backend.path_for_export(handle)
    started = time.perf_counter()
    fill(path, size, pattern)
    elapsed = time.perf_counter() - started
    with open(path, "rb") as file:
        allocated, extents = os.fstat(file.fileno()).st_blocks * 512, len(fiemap(file.fileno()))
    if allocated < size:
        raise RuntimeError(f"template {handle} is sparse: {allocated} of {size} bytes allocated")
    return Template(handle, size, elapsed, allocated, extents)




def sync_filesystem(path: Path | str) -> None:
    """Flush the filesystem holding `path` (and through the loop device, the image file)."""
    run_to_end(["sync", "--file-system", str(path)])


def same_samples(first: str, second: str, size: int) -> bool:
    """Whether the two files agree in their first, middle and last block (a cheap check that a clone is a copy)."""
    with open(first, "rb") as a, open(second, "rb") as b:
        return all(
            os.pread(a.fileno(), BLOCK, at) == os.pread(b.fileno(), BLOCK, at)
            for at in (0, size // 2 // BLOCK * BLOCK, size - BLOCK)
        )


def time_clones(backend: ReflinkBackend, template: Template) -> list[float]:
    """Seconds each of RUNS clones of `template` took through the backend; every clone is checked, then deleted."""
    durations = []
    for run in range(RUNS):
        name = f"clone-{label(template.size)}-{run}"
        started = time.perf_counter()
        backend.clone(template.handle, name)
        durations.append(time.perf_counter() - started)
        try:
            if not same_samples(backend.path_for_export(template.handle), backend.path_for_export(name), template.size):
                raise RuntimeError(f"clone {name} differs from {template.handle}")
        finally:
            backend.delete(name)
    return durations


def time_full_copy(source: str, mountpoint: Path) -> float:
    """Seconds a full, durable copy of `source` takes: `cp --reflink=never --sparse=never`, then sync; the copy is deleted after."""
    target = mountpoint / "full-copy.img"
    sync_filesystem(mountpoint)  # nothing left over from earlier steps is flushed inside the timing
    started = time.perf_counter()
    try:
        run_to_end(["cp", "--reflink=never", "--sparse=never", source, str(target)])
        sync_filesystem(target)
        return time.perf_counter() - started
    finally:
        target.unlink(missing_ok=True)


def summarize(plan: Plan, clones: dict[int, list[float]], full_copy: float, facts: dict[str, Any],
              templates: list[Template]) -> dict[str, Any]:
    """The results document: medians, raw runs, ratios, goals and whether each is met."""
    small, large = label(plan.small), label(plan.large)
    clone_small, clone_large = (statistics.median(clones[plan.small]), statistics.median(clones[plan.large]))
    ratio = clone_large / clone_small
    speedup = full_copy / clone_large
    ratio_met = ratio <= RATIO_GOAL or max(clone_small, clone_large) < NOISE_FLOOR_S
    speedup_met = speedup >= SPEEDUP_GOAL
    return {
        "benchmark": "clone",
        "mode": "small" if plan == SMALL else "full",
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kernel": os.uname().release,
        "backend": facts["backend"],
        "filesystem": facts["filesystem"],
        "reflink": facts["reflink"],
        "image_bytes": plan.image_bytes,
        "templates": {
            label(t.size): {"bytes": t.size, "allocated_bytes": t.allocated_bytes, "extents": t.extents,
                            "fill_s": round(t.fill_s, 3)}
            for t in templates
        },
        "runs": RUNS,
        f"clone_{small}_s": clone_small,
        f"clone_{large}_s": clone_large,
        f"clone_{small}_runs_s": clones[plan.small],
        f"clone_{large}_runs_s": clones[plan.large],
        f"full_copy_{large}_s": full_copy,
        "full_copy_command": ["cp", "--reflink=never", "--sparse=never", "SRC", "DST", "&&", "sync", "-f", "DST"],
        f"ratio_{large}_vs_{small}": ratio,
        "speedup_vs_full_copy": speedup,
        "goals": {
            f"ratio_{large}_vs_{small}": {
                "goal": f"<= {RATIO_GOAL}, or both clones under {NOISE_FLOOR_S * 1000:.0f} ms",
                "met": ratio_met,
            },
            "speedup_vs_full_copy": {"goal": f">= {SPEEDUP_GOAL}", "met": speedup_met},
        },
        "all_goals_met": ratio_met and speedup_met,
    }


def print_report(plan: Plan, results: dict[str, Any]) -> None:
    small, large = label(plan.small), label(plan.large)
    clone_small, clone_large = results[f"clone_{small}_s"], results[f"clone_{large}_s"]
    full_copy = results[f"full_copy_{large}_s"]
    goals = results["goals"]
    verdict = {True: "met", False: "MISSED"}
    print()
    print(f"{'':34}{'ours: reflink clone':>22}{'baseline: full copy':>22}{'baseline / ours':>18}")
    print(f"{human(plan.small) + ' template (median of ' + str(RUNS) + ')':34}{clone_small * 1000:>19.2f} ms{'-':>22}{'-':>18}")
    print(f"{human(plan.large) + ' template (median of ' + str(RUNS) + ')':34}{clone_large * 1000:>19.2f} ms"
          f"{full_copy:>20.2f} s{results['speedup_vs_full_copy']:>17.0f}x")
    print()
    ratio_key = f"ratio_{large}_vs_{small}"
    print(f"clone {human(plan.large)} / clone {human(plan.small)}: {results[ratio_key]:.2f} "
          f"(goal {goals[ratio_key]['goal']}): {verdict[goals[ratio_key]['met']]}")
    print(f"speedup vs full copy: {results['speedup_vs_full_copy']:.0f}x "
          f"(goal {goals['speedup_vs_full_copy']['goal']}): {verdict[goals['speedup_vs_full_copy']['met']]}")


def measure(plan: Plan, mountpoint: Path) -> dict[str, Any]:
    """Fill the templates, time the clones and the full copy; return the results document."""
    backend = ReflinkBackend(str(mountpoint))
    facts = backend.facts()
    if not facts["reflink"]:
        raise RuntimeError(f"the scratch filesystem at {mountpoint} cannot reflink: {facts}")
    pattern = fill_pattern()
    templates = []
    for size in (plan.small, plan.large):
        print(f"filling the {human(size)} template ...", end=" ", flush=True)
        templates.append(make_template(backend, size, pattern))
        t = templates[-1]
        print(f"{t.fill_s:.1f} s ({size / MIB / t.fill_s:.0f} MiB/s, {t.extents} extents)")
    sync_filesystem(mountpoint)
    clones = {t.size: time_clones(backend, t) for t in templates}
    print(f"full copy of the {human(plan.large)} template ...", end=" ", flush=True)
    full_copy = time_full_copy(backend.path_for_export(templates[-1].handle), mountpoint)
    print(f"{full_copy:.1f} s")
    return summarize(plan, clones, full_copy, facts, templates)






def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="64 MiB and 1 GiB templates: a quick check")
    plan = SMALL if parser.parse_args(argv).small else FULL
    require_root_and("bench/clone.py", ("mkfs.xfs", "losetup", "mount", "umount", "cp", "sync"))
    free = check_free_space(tempfile.gettempdir(), plan.data_bytes + SPACE_MARGIN)
    print(f"clone benchmark: {human(plan.small)} and {human(plan.large)} templates, "
          f"{human(plan.image_bytes)} sparse XFS image in {tempfile.gettempdir()} ({free / GIB:.0f} GiB free)")
    exit_on_sigterm()
    with scratch_pool(plan) as mountpoint:
        results = measure(plan, mountpoint)
    print_report(plan, results)
    print(f"\nwrote {write_results(plan.results_file, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
