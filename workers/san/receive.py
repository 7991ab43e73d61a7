"""`python -m workers.san.receive --backend reflink --pool DIR` (or `--backend lvm --volume-group VG`):
the receiving end of a DR ship, run by the sending SAN over SSH on the peer SAN host.

It reads one ship on stdin and answers on stdout (workers.san.replication's frames), so nothing but
frames may reach stdout: logs go to stderr. Exits 0 once the point is committed, 1 otherwise.
"""

import argparse
import logging
import sys

from errors import LaxError
from workers.san.backend import VolumeBackend
from workers.san.lvm import LvmThinBackend
from workers.san.reflink import ReflinkBackend
from workers.san.replication import receive

log = logging.getLogger("laxcluster.receive")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers.san.receive", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["reflink", "lvm"], required=True)
    parser.add_argument("--pool", help="the reflink pool directory")
    parser.add_argument("--volume-group", help="the LVM volume group of the thin pool")
    args = parser.parse_args(argv)
    if args.backend == "reflink" and not args.pool:
        parser.error("--backend reflink needs --pool")
    if args.backend == "lvm" and not args.volume_group:
        parser.error("--backend lvm needs --volume-group")
    return args


def backend_from(args: argparse.Namespace) -> VolumeBackend:
    if args.backend == "reflink":
        return ReflinkBackend(args.pool)
    return LvmThinBackend(args.volume_group)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="receive: %(levelname)s %(message)s")
    args = parse_args(argv)
    reader, writer = sys.stdin.buffer, sys.stdout.buffer
    # Anything printed by mistake would corrupt the frames on stdout: it goes to stderr instead.
    sys.stdout = sys.stderr
    try:
        receive(backend_from(args), reader, writer)
    except LaxError as exc:
        log.error("ship refused (%s): %s", exc.code, exc.message)
        return 1
    log.info("ship committed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
