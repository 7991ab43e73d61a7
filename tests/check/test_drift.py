"""The comparison behind `laxcluster check`, as a pure function: every kind of drift is found, what the
rows own is not reported, busy VMs are skipped, and the safe drifts become repair actions in a safe order."""

from tasks.inventory.drift import (
    AnchorRow,
    DomainFacts,
    Inventory,
    LeaseRow,
    Observed,
    SanFacts,
    TargetFacts,
    TemplateRow,
    VmRow,
    VolumeRow,
    compare,
    plan_repairs,
)

PREFIX = "iqn.2026-11.org.laxcluster"
UUID = "0b5e4c1e-0000-4000-8000-000000000001"
OTHER = "0b5e4c1e-0000-4000-8000-000000000002"
IQN = f"{PREFIX}:site-a.vm-{UUID}"
ACL = ("iqn.2026-11.org.laxcluster:cs1", "iqn.2026-11.org.laxcluster:cs2")
DISK, SEED = f"vm-{UUID}-disk", f"vm-{UUID}-seed"


def pool(*handles: str) -> dict[str, str]:
    return {handle: f"/pool/{handle}.img" for handle in handles}


def inventory(**changes) -> Inventory:
    """One running VM `web` on cs1 with a disk and a seed exported as LUNs 1 and 2, a template, a lease."""
    base = dict(
        volumes=(VolumeRow("san-a", DISK, "disk", IQN, 1, UUID, "web"), VolumeRow("san-a", SEED, "seed", IQN, 2, UUID, "web")),
        templates=(TemplateRow("san-a", "tpl-3f9a", "tiny"),),
        vms=(VmRow(1, UUID, "web", "cs1", "running"),),
        leases=(LeaseRow(1, 1, "192.0.2.10", "52:54:00:00:00:01"),),
        snapshots=frozenset({("san-a", f"{DISK}@bk-1")}),
        anchors=(AnchorRow("san-a", f"{DISK}@bk-1", "web"),),
        initiators={"san-a": ACL}, iqn_prefix=PREFIX, server_uris={"cs1": "qemu+tcp://cs1/system"},
    )
    return Inventory(**{**base, **changes})


def target(**changes) -> TargetFacts:
    return TargetFacts(**{"iqn": IQN, "luns": {1: f"/pool/{DISK}.img", 2: f"/pool/{SEED}.img"}, "initiators": ACL,
                          "sessions": 1, **changes})


def observed(volumes=None, targets=None, domains=None, **changes) -> Observed:
    """What a SAN and two servers hold when everything agrees with `inventory()`."""
    volumes = pool(DISK, SEED, "tpl-3f9a", f"{DISK}@bk-1") if volumes is None else volumes
    san = SanFacts(volumes, (target(),) if targets is None else targets)
    servers = {"cs1": (DomainFacts(UUID, "web", "running"),) if domains is None else domains, "cs2": ()}
    return Observed(**{"sans": {"san-a": san}, "servers": servers, **changes})


def found(inv: Inventory, seen: Observed) -> set[tuple]:
    return {(d.kind, d.resource, d.where, d.what, d.safe) for d in compare(inv, seen).drifts}


def test_everything_the_rows_own_is_no_drift():
    assert compare(inventory(), observed()).drifts == []


def test_orphan_volumes_and_snapshots_are_safe_only_when_named_like_ours_and_unexported():
    extra = pool("vm-9c1d-disk", "tpl-77ab", "scratch", f"{DISK}@bk-old", f"{DISK}@manual")
    exported = TargetFacts(f"{PREFIX}:site-a.vm-9c1d", {1: "/pool/tpl-77ab.img"}, ACL, sessions=2)
    seen = observed(volumes={**observed().sans["san-a"].volumes, **extra}, targets=(target(), exported))
    assert found(inventory(), seen) == {
        ("orphan", "volume", "san-a", "vm-9c1d-disk", True),
        ("orphan", "volume", "san-a", "tpl-77ab", False),  # a target with a session exports it
        ("orphan", "volume", "san-a", "scratch", False),  # not a name we give
        ("orphan", "snapshot", "san-a", f"{DISK}@bk-old", True),
        ("orphan", "snapshot", "san-a", f"{DISK}@manual", False),
        ("orphan", "target", "san-a", f"{PREFIX}:site-a.vm-9c1d", False),  # logged in
    }


def test_an_orphan_target_nobody_uses_is_deleted_before_the_volume_it_exports():
    orphan_iqn = f"{PREFIX}:site-a.vm-9c1d"
    seen = observed(volumes={**observed().sans["san-a"].volumes, **pool("vm-9c1d-disk")},
                    targets=(target(), TargetFacts(orphan_iqn, {1: "/pool/vm-9c1d-disk.img"}, ACL)))
    drifts = compare(inventory(), seen).drifts
    assert {(d.resource, d.what, d.safe) for d in drifts} == {("volume", "vm-9c1d-disk", True), ("target", orphan_iqn, True)}
    assert plan_repairs(drifts).sans == {"san-a": [{"op": "delete-target", "what": orphan_iqn},
                                                   {"op": "delete-volume", "what": "vm-9c1d-disk"}]}


def test_a_foreign_target_is_reported_but_never_deleted():
    seen = observed(targets=(target(), TargetFacts("iqn.2001-04.com.example:backup", {})))
    assert found(inventory(), seen) == {("orphan", "target", "san-a", "iqn.2001-04.com.example:backup", False)}


def test_missing_volumes_are_not_safe_and_block_re_exporting():
    seen = observed(volumes=pool(SEED, f"{DISK}@bk-1"), targets=())
    drifts = {d.what: d for d in compare(inventory(), seen).drifts}
    assert {(d.kind, d.resource, d.safe) for d in drifts.values()} == {
        ("missing", "volume", False), ("missing", "target", False)}
    assert set(drifts) == {DISK, "tpl-3f9a", IQN}
    assert "laxcluster vm delete web" in drifts[DISK].repair and "template import tiny" in drifts["tpl-3f9a"].repair


def test_export_drifts_are_repaired_by_re_exporting_the_san_once():
    odd = target(luns={1: "/pool/elsewhere.img", 3: "/pool/old.img"}, initiators=(ACL[0], "iqn.2026-11.org.laxcluster:cs9"))
    drifts = compare(inventory(), observed(targets=(odd,))).drifts
    assert {(d.kind, d.resource, d.what, d.safe) for d in drifts} == {
        ("mismatched", "lun", f"{IQN} lun 1", True), ("missing", "lun", f"{IQN} lun 2", True),
        ("orphan", "lun", f"{IQN} lun 3", True), ("mismatched", "acl", IQN, True)}
    acl = next(d for d in drifts if d.resource == "acl")
    assert ACL[1] in acl.detail and "cs9" in acl.detail
    assert plan_repairs(drifts).sans == {"san-a": [{"op": "restore-exports", "what": "san-a"}]}
    gone = compare(inventory(), observed(targets=())).drifts
    assert [(d.kind, d.resource, d.what, d.action) for d in gone] == [("missing", "target", IQN, "restore-exports")]


def test_domains_are_matched_by_uuid_on_the_rows_server():
    stray, stale = "77777777-0000-4000-8000-000000000007", DomainFacts(UUID, "web", "shut off")
    seen = observed(domains=(DomainFacts(UUID, "renamed-by-hand", "running"), DomainFacts(stray, "junk", "shut off"),
                             DomainFacts(OTHER, "ghost", "running")))
    seen.servers["cs2"] = (stale,)
    assert found(inventory(), seen) == {
        ("orphan", "domain", "cs1", stray, True),
        ("orphan", "domain", "cs1", OTHER, False),  # running: a person decides
        ("mismatched", "domain", "cs2", UUID, True),  # a stopped stale copy beside the real one
    }
    running_elsewhere = observed(domains=())
    running_elsewhere.servers["cs2"] = (DomainFacts(UUID, "web", "running"),)
    drifts = compare(inventory(), running_elsewhere).drifts
    assert [(d.kind, d.where, d.safe) for d in drifts] == [("mismatched", "cs2", False)]
    assert "laxcluster vm start web" in drifts[0].repair


def test_a_missing_domain_and_a_state_that_disagrees():
    assert found(inventory(), observed(domains=())) == {("missing", "domain", "cs1", UUID, False)}
    stopped = compare(inventory(), observed(domains=(DomainFacts(UUID, "web", "shut off"),))).drifts
    assert [(d.kind, d.resource, d.safe) for d in stopped] == [("mismatched", "domain", False)]
    assert "laxcluster vm start web" in stopped[0].repair


def test_leases_of_vanished_vms_and_vms_without_disks():
    inv = inventory(leases=(LeaseRow(1, 1, "192.0.2.10", "m1"), LeaseRow(2, 99, "192.0.2.11", "m2"), LeaseRow(3, None, "192.0.2.12", "m3")),
                    vms=(VmRow(1, UUID, "web", "cs1", "running"), VmRow(2, OTHER, "db", None, "shut off")))
    drifts = compare(inv, observed()).drifts
    assert {(d.kind, d.resource, d.what, d.safe) for d in drifts} == {("orphan", "lease", "2", True),
                                                                      ("missing", "vm", OTHER, False)}
    assert plan_repairs(drifts).leases == [2]


def test_a_lost_backup_anchor_is_reported():
    assert found(inventory(), observed(volumes=pool(DISK, SEED, "tpl-3f9a"))) == {
        ("missing", "snapshot", "san-a", f"{DISK}@bk-1", False)}


def test_what_a_job_works_on_is_busy_not_drift():
    installing = f"vm-{OTHER}-disk"
    seen = observed(volumes={**observed().sans["san-a"].volumes, **pool(installing)},
                    targets=(target(luns={1: "/pool/x.img"}), TargetFacts(f"{PREFIX}:site-a.vm-{OTHER}", {})), domains=())
    inv = inventory(busy_vms=frozenset({UUID, OTHER}),
                    vms=(VmRow(1, UUID, "web", "cs1", "running"), VmRow(2, OTHER, "new", None, "installing")))
    comparison = compare(inv, seen)
    assert comparison.drifts == []
    assert {f"san-a: {installing}", f"san-a: {IQN}", f"san-a: {PREFIX}:site-a.vm-{OTHER}"} <= set(comparison.busy)
    assert found(inventory(busy_template_sans=frozenset({"san-a"})), observed(
        volumes={**observed().sans["san-a"].volumes, **pool("tpl-new")})) == set()


def test_an_unanswered_san_or_server_is_unreachable_and_nothing_is_guessed_about_it():
    seen = Observed(sans={}, servers={"cs1": (DomainFacts(UUID, "web", "running"),)},
                    unreachable={"san-a": ("san", "no answer within 5 s"), "cs2": ("server", "libvirt down")})
    drifts = compare(inventory(), seen).drifts
    assert [(d.kind, d.resource, d.where, d.safe) for d in drifts] == [
        ("unreachable", "server", "cs2", False), ("unreachable", "san", "san-a", False)]
    assert "no answer within 5 s" in drifts[1].detail


def in_maintenance(**changes) -> Inventory:
    """`web` runs on san-a's host (vm start --on-san): its server's domain is stopped."""
    return inventory(vms=(VmRow(1, UUID, "web", "cs1", "maintenance"),), **changes)


def on_san_host(*domains: DomainFacts, error: str | None = None, acl: tuple[str, ...] = ()) -> Observed:
    seen = observed(targets=(target(initiators=acl, sessions=0),), domains=(DomainFacts(UUID, "web", "shut off"),))
    san = seen.sans["san-a"]
    facts = SanFacts(san.volumes, san.targets, None if error else domains, error)
    return Observed(sans={"san-a": facts}, servers=seen.servers)


def test_a_vm_in_maintenance_runs_on_the_san_host_with_its_target_locked():
    assert compare(in_maintenance(), on_san_host(DomainFacts(UUID, "web", "running"))).drifts == []
    assert found(in_maintenance(), on_san_host(DomainFacts(UUID, "web", "running"), acl=ACL)) == {
        ("mismatched", "acl", "san-a", IQN, True)}
    assert found(in_maintenance(), on_san_host(DomainFacts(UUID, "web", "shut off"))) == {
        ("mismatched", "domain", "san-a", UUID, False)}
    assert found(in_maintenance(), on_san_host()) == {("mismatched", "domain", "san-a", UUID, False)}
    assert found(in_maintenance(), on_san_host(error="nothing answers")) == {
        ("unreachable", "san host", "san-a", "san-a", False)}


def test_a_domain_on_the_san_host_of_no_vm_in_maintenance_is_reported_not_repaired():
    seen = observed()
    host = SanFacts(seen.sans["san-a"].volumes, seen.sans["san-a"].targets,
                    (DomainFacts(UUID, "web", "running"), DomainFacts(OTHER, "stray", "shut off")))
    assert found(inventory(), Observed(sans={"san-a": host}, servers=seen.servers)) == {
        ("mismatched", "domain", "san-a", UUID, False), ("orphan", "domain", "san-a", OTHER, False)}
    # A SAN host nobody needs may be down: no drift.
    quiet = SanFacts(seen.sans["san-a"].volumes, seen.sans["san-a"].targets, None, "nothing answers")
    assert compare(inventory(), Observed(sans={"san-a": quiet}, servers=seen.servers)).drifts == []
