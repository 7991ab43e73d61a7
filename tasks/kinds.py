"""Every job kind, declared once: its typed parameters, the queue it runs on, the target it locks,
the audit action it is recorded under, and the module whose workflow runs it.

Parameters are pydantic models: validated when a job is submitted, stored as JSON on the job,
read as attributes in the workflow, and the source of the API's request schemas where they match.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from errors import InvalidInput, NotFound, ServerNotFound, UnknownKind
from models import Cluster, ClusterServer, San, Site, VirtualMachine, Volume
from models.protection import Backup, BackupPolicy, BackupStore
from tasks.inventory.retention import selected_vms
from tasks.inventory.vms import find_vm, site_and_san
from tasks.queues import CONTROL, node_queue, san_queue


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NoParams(Params):
    pass


NOOP_MAX_SECONDS, NOOP_MAX_STEPS = 600, 1000
MAX_SHUTDOWN_TIMEOUT_S = 3600
MAX_BANDWIDTH_MIB_S = 100_000


class Noop(Params):
    seconds: float = Field(0.0, ge=0, le=NOOP_MAX_SECONDS)
    steps: int = Field(1, ge=1, le=NOOP_MAX_STEPS)


class OfVm(Params):
    vm: str


class InstallVm(OfVm):
    disk_bytes: int | None = None
    server: str | None = None


class VmFromBackup(InstallVm):
    backup: str


class Power(OfVm):
    timeout_s: int | None = Field(None, ge=1, le=MAX_SHUTDOWN_TIMEOUT_S,
                                  description="shutdown and reboot: how long the guest gets before the job fails")
    on_san: bool = Field(False, description="start: run the VM on its SAN host for maintenance, its exports locked")


class Migrate(OfVm):
    to: str | None = Field(None, description="migrate: the destination server (default: placement chooses)")
    live: bool = Field(True, description="migrate: keep the VM running while it moves")
    check: bool = Field(False, description="migrate: only run the pre-flight checks, move nothing")
    bandwidth_mib_s: int | None = Field(None, ge=1, le=MAX_BANDWIDTH_MIB_S,
                                        description="migrate: cap the memory transfer rate")


class Rescue(OfVm):
    end: bool = Field(False, description="rescue: leave the rescue system, the VM's own domain back, stopped")


class OfServer(Params):
    server: str


class OfSan(Params):
    san: str


class VmDisks(OfVm):
    disk_bytes: int


class VmOnSan(OfVm):
    san: str


class PowerOnSan(VmOnSan):
    action: Literal["shutdown", "reboot", "destroy"]
    timeout_s: int | None = None


class ExportVmDisks(VmOnSan):
    initiator: str


class ImportTemplate(OfSan):
    name: str
    source_path: str
    format: Literal["raw", "qcow2"] = Field(description="the image's format, never probed from its content")
    os: str = "linux"
    boot: dict[str, Any] | None = None
    default_size_bytes: int | None = None


class AddDisk(OfVm):
    size_bytes: int
    label: str | None = None


class OfDisk(OfVm):
    volume_id: int


class DiskOnServer(OfDisk):
    server: str


class CreateDataDisk(VmOnSan):
    volume: str
    lun: int
    size_bytes: int
    label: str | None = None


class RemoveDataDisk(VmOnSan):
    volume: str


class ResizeVolume(Params):
    volume_id: int
    size_bytes: int


class SnapshotBackup(OfVm):
    mode: Literal["full", "diff"] = "full"
    store: str | None = Field(None, description="default: the only store, if there is exactly one")
    policy: str | None = None


class OfBackup(Params):
    backup: str


class Restore(OfBackup):
    in_place: bool = False
    as_volume: str | None = Field(None, alias="as")


class OfPolicy(Params):
    policy: str


class VmOnServer(OfVm):
    server: str


class StartDomain(VmOnServer):
    generation: int | None = Field(None, description="refused unless the VM is still of this generation (no failover since)")


class RescueDomain(VmOnServer):
    end: bool = False


class ProbeBoot(VmOnServer):
    timeout_s: int | None = None


class PowerDomain(VmOnServer):
    action: Literal["shutdown", "reboot", "destroy"]
    timeout_s: int | None = None


class MigrateDomain(OfVm):
    source: str
    destination: str
    live: bool = True
    bandwidth_mib_s: int | None = None


class PreflightMigration(OfVm):
    source: str
    destination: str
    destination_uri: str
    destination_maintenance: bool
    free_memory_bytes: int
    free_vcpus: int
    memory_bytes: int
    vcpus: int


class SettleDomain(OfVm):
    source: str
    destination: str


class CheckCluster(Params):
    repair: bool = Field(False, description="check: also repair every drift that is safe to repair")
    timeout_s: int = Field(60, ge=1, le=3600, description="check: how long each SAN and server has to answer")


class RepairAction(Params):
    op: Literal["delete-volume", "delete-snapshot", "delete-target", "restore-exports", "undefine-domain"]
    what: str


class RepairSan(OfSan):
    actions: list[RepairAction]


class RepairNode(OfServer):
    actions: list[RepairAction]


class PromoteReplica(VmOnSan):
    point: str | None = None


class RetireCopy(VmOnSan):
    drop: bool = Field(False, description="also delete the stale volumes (their point snapshots stay)")


class Failover(OfVm):
    planned: bool = Field(True, description="stop the VM, ship the last changes, then switch (no data lost); "
                                            "false: the primary site is gone, start from a replica point")
    point: str | None = Field(None, description="unplanned: the replica point to start from (default: the newest)")
    server: str | None = Field(None, description="the server at the DR site to start on (default: placement)")


class Drill(OfVm):
    point: str | None = Field(None, description="the replica point to boot (default: the newest)")
    server: str | None = Field(None, description="the server at the DR site to boot it on (default: the first)")


class DrillOnSan(VmOnSan):
    point: str | None = None
    end: bool = False


class DrillDomain(VmOnServer):
    target: str | None = None
    san: str | None = None
    end: bool = False


Queue = Callable[[Session, Any], str]
Target = Callable[[Session, Any], str]


@dataclass(frozen=True)
class Kind:
    name: str
    params: type[Params]
    queue: Queue
    target: Target | None  # None: the submitter names the target
    module: str
    action: str = ""  # the audit action of a top-level job of this kind


def on_control(_: Session, __: Params) -> str:
    return CONTROL


def on_server(field: str) -> Queue:
    return lambda _, params: node_queue(getattr(params, field))


def on_san_of(resolve: Callable[[Session, Any], str]) -> Queue:
    """The queue of the site whose SAN `resolve` names."""
    return lambda session, params: san_queue(site_of_san(session, resolve(session, params)))


def site_of_san(session: Session, san: str) -> str:
    site = session.scalar(select(Site.name).join(San, San.site_id == Site.id).where(San.name == san))
    if site is None:
        raise NotFound(f"no SAN {san}", san=san)
    return site


def san_of_vm(session: Session, params: OfVm) -> str:
    """The SAN holding the VM's disk, or, before it has one, the SAN of its template."""
    return site_and_san(session, find_vm(session, params.vm))[1]


def san_of_server(session: Session, params: OfServer) -> str:
    """The SAN of the server's site (the one its initiator logs in to)."""
    san = session.scalar(select(San.name).join(Site, San.site_id == Site.id).join(Cluster, Cluster.site_id == Site.id)
                         .join(ClusterServer, ClusterServer.cluster_id == Cluster.id)
                         .where(ClusterServer.name == params.server).limit(1))
    if san is None:
        raise ServerNotFound(f"no cluster server {params.server}", server=params.server)
    return san


def san_of_volume(session: Session, params: ResizeVolume) -> str:
    return _existing(session.scalar(select(San.name).join(Volume, Volume.san_id == San.id)
                                    .where(Volume.id == params.volume_id)), f"no volume {params.volume_id}")


def san_of_backup(session: Session, params: OfBackup) -> str:
    return _existing(session.scalar(select(Backup.san_name).where(Backup.id == params.backup)), f"no backup {params.backup}")


def san_of_policy(session: Session, params: OfPolicy) -> str:
    """The SAN of the first of the policy's VMs that has a disk."""
    policy = session.scalar(select(BackupPolicy).where(BackupPolicy.name == params.policy))
    for vm in selected_vms(session, _existing(policy, f"no policy {params.policy}")):
        san = session.scalar(select(San.name).join(Volume, Volume.san_id == San.id).join(VirtualMachine)
                             .where(VirtualMachine.name == vm, Volume.role == "disk").limit(1))
        if san is not None:
            return san
    raise NotFound(f"policy {params.policy} selects no VM with a disk", policy=params.policy)


def server_lock(server: str) -> str:
    return f"server/{server}"


def backup_lock(vm: str) -> str:
    """The lock a backup of `vm` holds; deleting the VM waits for it."""
    return f"backup/{vm}"


def prune_lock(store: str) -> str:
    """The lock a prune of `store` holds; a backup into the store waits while it is taken."""
    return f"prune/{store}"


def prune_target(session: Session, params: OfPolicy) -> str:
    store = session.scalar(select(BackupStore.name).join(BackupPolicy, BackupPolicy.store_id == BackupStore.id)
                           .where(BackupPolicy.name == params.policy))
    return prune_lock(_existing(store, f"no policy {params.policy}"))


def restore_target(session: Session, params: Restore) -> str:
    """In place, the restore holds the VM; to a new volume, that volume."""
    if params.in_place:
        backup = _existing(session.get(Backup, params.backup), f"no backup {params.backup}")
        vm = session.get(VirtualMachine, backup.vm_id) if backup.vm_id is not None else None
        return f"vm/{vm.name if vm is not None else backup.vm_name}"
    return f"restore/{params.as_volume or params.backup}"


def _existing(value: Any, message: str) -> Any:
    if value is None:
        raise NotFound(message)
    return value


def volume_target(session: Session, params: ResizeVolume) -> str:
    """A VM's volume is changed under the VM's lock (no start, migration or restore meanwhile)."""
    vm = session.scalar(select(VirtualMachine.name).join(Volume, Volume.vm_id == VirtualMachine.id)
                        .where(Volume.id == params.volume_id))
    return f"vm/{vm}" if vm is not None else f"volume/{params.volume_id}"


def vm_target(_: Session, params: OfVm) -> str:
    return f"vm/{params.vm}"


def disks_target(_: Session, params: OfVm) -> str:
    return f"disks/{params.vm}"


def domain_target(_: Session, params: OfVm) -> str:
    return f"domain/{params.vm}"


def server_target(_: Session, params: OfServer) -> str:
    return server_lock(params.server)


CONTROL_VMS, CONTROL_MIGRATE, CONTROL_DISKS = "tasks.control.vms", "tasks.control.migrate", "tasks.control.disks"
SAN_DISKS, SAN_REPLICATION, CONTROL_DR = "tasks.san.disks", "tasks.san.replication", "tasks.control.dr"
SAN_VOLUMES, SAN_BACKUPS, NODE_DOMAINS = "tasks.san.volumes", "tasks.san.backups", "tasks.node.domains"

KINDS: dict[str, Kind] = {kind.name: kind for kind in [
    Kind("noop", Noop, on_control, None, "tasks.control.diagnostics", "job.noop"),
    Kind("refresh-servers", NoParams, on_control, lambda _, __: "servers", "tasks.control.servers", "servers.refresh"),
    Kind("install-vm", InstallVm, on_control, vm_target, CONTROL_VMS, "vm.install"),
    Kind("restore-vm", VmFromBackup, on_control, vm_target, CONTROL_VMS, "backup.restore"),
    Kind("verify-boot", VmFromBackup, on_control, vm_target, CONTROL_VMS, "backup.verify"),
    Kind("start", Power, on_control, vm_target, CONTROL_VMS, "vm.start"),
    Kind("shutdown", Power, on_control, vm_target, CONTROL_VMS, "vm.shutdown"),
    Kind("reboot", Power, on_control, vm_target, CONTROL_VMS, "vm.reboot"),
    Kind("destroy", Power, on_control, vm_target, CONTROL_VMS, "vm.destroy"),
    Kind("delete-vm", OfVm, on_control, vm_target, CONTROL_VMS, "vm.delete"),
    Kind("rescue", Rescue, on_control, vm_target, "tasks.control.rescue", "vm.rescue"),
    Kind("migrate", Migrate, on_control, vm_target, CONTROL_MIGRATE, "vm.migrate"),
    Kind("add-disk", AddDisk, on_control, vm_target, CONTROL_DISKS, "vm.disk.add"),
    Kind("remove-disk", OfDisk, on_control, vm_target, CONTROL_DISKS, "vm.disk.remove"),
    Kind("create-data-disk", CreateDataDisk, on_san_of(lambda _, p: p.san), disks_target, SAN_DISKS),
    Kind("remove-data-disk", RemoveDataDisk, on_san_of(lambda _, p: p.san), disks_target, SAN_DISKS),
    Kind("attach-disk", DiskOnServer, on_server("server"), domain_target, NODE_DOMAINS),
    Kind("detach-disk", DiskOnServer, on_server("server"), domain_target, NODE_DOMAINS),
    Kind("evacuate", OfServer, on_control, server_target, "tasks.control.evacuate", "server.evacuate"),
    Kind("activate-server", OfServer, on_control, server_target, "tasks.control.servers", "server.activate"),
    Kind("recover-server", OfServer, on_control, lambda _, p: f"recover/{p.server}", "tasks.control.ha", "server.recover"),
    Kind("fence-server", OfServer, on_san_of(san_of_server), server_target, "tasks.san.fencing", "server.fence"),
    Kind("prepare-vm-disks", VmDisks, on_san_of(san_of_vm), disks_target, SAN_VOLUMES),
    Kind("remove-vm-disks", VmOnSan, on_san_of(lambda _, p: p.san), disks_target, SAN_VOLUMES),
    Kind("refresh-luns", OfVm, on_san_of(san_of_vm), disks_target, SAN_VOLUMES),
    Kind("export-vm-disks", ExportVmDisks, on_san_of(lambda _, p: p.san), disks_target, SAN_VOLUMES),
    Kind("import-template", ImportTemplate, on_san_of(lambda _, p: p.san),
         lambda _, p: f"template/{p.san}/{p.name}", SAN_VOLUMES, "template.import"),
    Kind("resize-volume", ResizeVolume, on_san_of(san_of_volume), volume_target, SAN_VOLUMES,
         "volume.resize"),
    Kind("refresh-san", OfSan, on_san_of(lambda _, p: p.san), lambda _, p: f"san/{p.san}", SAN_VOLUMES, "san.refresh"),
    Kind("snapshot-backup", SnapshotBackup, on_san_of(san_of_vm), lambda _, p: backup_lock(p.vm), SAN_BACKUPS,
         "backup.create"),
    Kind("verify-backup", OfBackup, on_san_of(san_of_backup), lambda _, p: f"backup-verify/{p.backup}", SAN_BACKUPS,
         "backup.verify"),
    Kind("restore", Restore, on_san_of(san_of_backup), restore_target, SAN_BACKUPS, "backup.restore"),
    Kind("prune-backups", OfPolicy, on_san_of(san_of_policy), prune_target, "tasks.san.prune", "backup.prune"),
    Kind("start-on-san", VmOnSan, on_san_of(lambda _, p: p.san), domain_target, "tasks.san.maintenance"),
    Kind("power-on-san", PowerOnSan, on_san_of(lambda _, p: p.san), domain_target, "tasks.san.maintenance"),
    Kind("start-domain", StartDomain, on_server("server"), domain_target, NODE_DOMAINS),
    Kind("power-domain", PowerDomain, on_server("server"), domain_target, NODE_DOMAINS),
    Kind("probe-boot", ProbeBoot, on_server("server"), domain_target, NODE_DOMAINS),
    Kind("remove-domain", VmOnServer, on_server("server"), domain_target, NODE_DOMAINS),
    Kind("rescue-domain", RescueDomain, on_server("server"), domain_target, NODE_DOMAINS),
    Kind("migrate-domain", MigrateDomain, on_server("source"), domain_target, "tasks.node.migrate"),
    Kind("preflight-migration", PreflightMigration, on_server("source"), lambda _, p: f"preflight/{p.vm}",
         "tasks.node.migrate"),
    Kind("replicate-to-dr", OfVm, on_san_of(san_of_vm), lambda _, p: f"replicate/{p.vm}", SAN_REPLICATION,
         "dr.replicate"),
    Kind("promote-replica", PromoteReplica, on_san_of(lambda _, p: p.san), lambda _, p: f"replica/{p.vm}",
         SAN_REPLICATION),
    Kind("retire-copy", RetireCopy, on_san_of(lambda _, p: p.san), lambda _, p: f"retire/{p.vm}", SAN_REPLICATION),
    Kind("drill-volumes", DrillOnSan, on_san_of(lambda _, p: p.san), lambda _, p: f"drill-volumes/{p.vm}", SAN_REPLICATION),
    Kind("drill-domain", DrillDomain, on_server("server"), lambda _, p: f"drill-domain/{p.vm}", "tasks.node.drill"),
    Kind("failover", Failover, on_control, vm_target, CONTROL_DR, "dr.failover"),
    Kind("failback", Failover, on_control, vm_target, CONTROL_DR, "dr.failback"),
    Kind("disable-replication", OfVm, on_control, vm_target, CONTROL_DR, "dr.disable"),
    Kind("drop-replica-points", VmOnSan, on_san_of(lambda _, p: p.san), lambda _, p: f"drop-replicas/{p.san}/{p.vm}",
         SAN_REPLICATION),
    Kind("drill", Drill, on_control, lambda _, p: f"drill/{p.vm}", CONTROL_DR, "dr.drill"),
    Kind("settle-domain", SettleDomain, on_server("source"), domain_target, "tasks.node.migrate"),
    Kind("refresh-server", OfServer, on_server("server"), server_target, "tasks.node.servers"),
    Kind("remove-stale-domains", OfServer, on_server("server"), lambda _, p: f"stale/{p.server}", "tasks.node.servers"),
    Kind("check-cluster", CheckCluster, on_control, lambda _, __: "cluster-check", "tasks.control.check", "cluster.check"),
    Kind("inspect-san", OfSan, on_san_of(lambda _, p: p.san), lambda _, p: f"inspect/{p.san}", "tasks.san.inspect"),
    Kind("repair-san", RepairSan, on_san_of(lambda _, p: p.san), lambda _, p: f"repair/{p.san}", "tasks.san.inspect"),
    Kind("inspect-node", OfServer, on_server("server"), lambda _, p: f"inspect/{p.server}", "tasks.node.inspect"),
    Kind("repair-node", RepairNode, on_server("server"), lambda _, p: f"repair/{p.server}", "tasks.node.inspect"),
]}


def kind_of(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownKind(f"no job kind {name}", kind=name) from None


def parse(kind: Kind, params: dict[str, Any] | Params | None) -> Params:
    """The kind's typed parameters from a dict (or as given); InvalidInput naming what is wrong."""
    if isinstance(params, kind.params):
        return params
    try:
        return kind.params.model_validate(params or {})
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InvalidInput(f"{kind.name}: {field}: {first['msg']}", field=field, kind=kind.name) from None


def request_schema(*models: type[Params], exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The JSON schema of a request body that carries these parameters (the fields of all `models`, less
    `exclude`, such as what the URL names), for the API's OpenAPI document."""
    properties: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(by_alias=True)
        properties.update({name: _plain(field) for name, field in schema["properties"].items() if name not in exclude})
    return {"type": "object", "properties": properties}


def _plain(field: dict[str, Any]) -> dict[str, Any]:
    """A field's schema without pydantic's generated title."""
    return {key: value for key, value in field.items() if key != "title"}


def stored(params: Params) -> dict[str, Any]:
    """The parameters as the job row keeps them: what was given, under its wire names."""
    return params.model_dump(mode="json", by_alias=True, exclude_unset=True)


def load_workflows(kind: Kind) -> None:
    """Import the module that registers the kind's workflow (each process loads what it runs)."""
    importlib.import_module(kind.module)
