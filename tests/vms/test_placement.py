"""Placement reserves atomically: installs placed at the same moment never overcommit a server."""

import threading
from collections import Counter

from sqlalchemy import select, update

from errors import NoCapacity
from models import ClusterServer, VirtualMachine
from models.db import transaction
from tasks.inventory.config_sync import sync_from_config
from tasks.inventory.placement import lock_placement, place_vm
from tests.fixtures import factories

MIB = 1 << 20
RACERS = 8
ROOM_FOR = 3


def test_concurrent_placements_never_overcommit_a_server(rt):
    with transaction(rt.sessions) as session:
        sync_from_config(session, rt.config)
        # cs1 alone, with room for exactly ROOM_FOR VMs of 256 MiB (no overcommit, no reserve).
        session.execute(update(ClusterServer).values(maintenance=True))
        session.execute(update(ClusterServer).where(ClusterServer.name == "cs1").values(
            maintenance=False, reachable=True, cpu_count=64, memory_total_bytes=ROOM_FOR * 256 * MIB,
            memory_free_bytes=64 << 30, memory_limit_bytes=None))
        cluster_id = session.scalar(select(ClusterServer.cluster_id).where(ClusterServer.name == "cs1"))
        ids = [factories.vm(session, f"race{n}", cluster_id=cluster_id).id for n in range(RACERS)]
    rt.config.raw["placement"].update(memory_overcommit=1.0, cpu_overcommit=1.0, memory_reserve="0")
    start, outcomes = threading.Barrier(RACERS), {}

    def race(vm_id: int) -> None:
        start.wait()
        try:
            with transaction(rt.sessions) as session:
                lock_placement(session)
                outcomes[vm_id] = place_vm(session, rt.config, session.get(VirtualMachine, vm_id), None).name
        except NoCapacity:
            outcomes[vm_id] = None

    threads = [threading.Thread(target=race, args=(vm_id,)) for vm_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == RACERS
    assert Counter(outcomes.values()) == {"cs1": ROOM_FOR, None: RACERS - ROOM_FOR}
    with rt.sessions() as session:
        placed = session.scalars(select(VirtualMachine.memory_bytes).where(VirtualMachine.server_id.is_not(None)))
        assert sum(placed) == ROOM_FOR * 256 * MIB
