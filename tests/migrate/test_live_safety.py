"""Which domains may move live: QEMU before 9.0 loses guest writes in a live migration under TCG (its
dirty-bitmap sync does not re-arm TCG's write tracking), so such a domain is moved paused instead."""

import libvirt
import pytest

from workers.node.migrate import MIGRATE_FLAGS, live_loses_memory, migration_flags, safe_to_move_live


@pytest.mark.parametrize(("domain_type", "version", "loses"), [
    ("qemu", 7_002_022, True),   # Debian 12's QEMU 7.2, TCG: this machine
    ("qemu", 8_002_007, True),
    ("qemu", 9_000_000, False),  # the fix landed in 9.0
    ("kvm", 7_002_022, False),   # KVM tracks dirty pages itself
    ("xen", 4_017_000, False),
    (None, 7_002_022, False),
])
def test_only_tcg_domains_on_qemu_before_9_lose_memory_live(domain_type, version, loses):
    assert live_loses_memory(domain_type, version) is loses


def test_the_test_drivers_domain_is_not_a_tcg_one():
    conn = libvirt.open("test:///default")
    try:
        assert safe_to_move_live(conn, conn.lookupByName("test")) is True
    finally:
        conn.close()


def test_flags_ask_for_live_only_when_asked_and_safe():
    conn = libvirt.open("test:///default")
    try:
        domain = conn.lookupByName("test")
        assert migration_flags(conn, domain, live=True) == (MIGRATE_FLAGS | libvirt.VIR_MIGRATE_LIVE, None)
        assert migration_flags(conn, domain, live=False) == (MIGRATE_FLAGS, None)
    finally:
        conn.close()
