"""The error catalogue: every error a LaxCluster user may see, each code defined here and only here.

An error is a type with a stable `code` (clients and tests match on it), the HTTP status the API
answers with when it reaches the edge (api/problems.py turns it into problem+json), and `extra`,
machine-readable details. Errors are raised deep (a driver in workers/, a task in tasks/, a
blueprint in api/) and caught once, at the edge; a job that fails records the code in its row.
This module imports nothing of ours, so every layer may import it.

Decisions that keep one meaning per code:

- `XNotFound` (404) says the thing does not exist: the URL names it, or a job finds it gone.
  `UnknownX` (422, an InvalidInput carrying `field`) says a request body names one that does not
  exist: the request is invalid, its URL is fine. So an install naming server cs9 answers 422
  `UnknownServer`, `GET /servers/cs9` answers 404 `ServerNotFound`; the same split holds for
  subnets (`UnknownSubnet`), SANs (`UnknownSan`) and backup stores (`UnknownStore`). A job
  parameter checked only inside the job (migrate's destination) stays `ServerNotFound`: no HTTP
  status is ever sent for it. `TemplateNotFound` keeps its code and its 422: templates are only
  ever named in a body, so it never had a second meaning. `UnknownAction` (404, the action is part
  of the URL) and `UnknownFilesystem` (409) keep theirs too.
- `TargetBusy` (409) is the job lock: a job holds the target a request wants; `extra['job_id']`
  names it. An iSCSI target with initiators still logged in is `IscsiTargetBusy`.
- `VolumeNotFound` is one error for the API (`GET /volumes/<id>`) and the volume backends alike.

Not here, on purpose: plain exceptions used as signals that never reach a user as such
(tasks.jobs.JobCancelled, which the runner turns into the `cancelled` state).
"""

from typing import Any


class LaxError(Exception):
    """Base of every LaxCluster error a user may see.

    `code` is stable (clients match on it); `http_status` is the status the API answers with
    when the error reaches it; `extra` holds machine-readable details (e.g. the holding job).
    """

    code = "Error"
    http_status = 500

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


# -- families: raised as they are for one-off cases, and the bases of the codes below -------------

class NotFound(LaxError):
    code = "NotFound"
    http_status = 404


class Conflict(LaxError):
    code = "Conflict"
    http_status = 409


class InvalidInput(LaxError):
    code = "InvalidInput"
    http_status = 422


# -- host commands -------------------------------------------------------------------------------

class CommandFailed(LaxError):
    """A host command exited non-zero; the message carries its stderr."""

    code = "CommandFailed"
    http_status = 502


# -- API edge: auth, backends, idempotency -------------------------------------------------------

class Unauthorized(LaxError):
    code = "Unauthorized"
    http_status = 401


class Forbidden(LaxError):
    code = "Forbidden"
    http_status = 403


class ServiceUnavailable(LaxError):
    """The inventory DB or Redis does not answer."""

    code = "ServiceUnavailable"
    http_status = 503


class BrokerUnavailable(LaxError):
    """The job queue is unreachable: the job was recorded as failed, not started."""

    code = "BrokerUnavailable"
    http_status = 503


class IdempotencyKeyReused(InvalidInput):
    """An Idempotency-Key came back with a different request."""

    code = "IdempotencyKeyReused"


class UpgradeRequired(LaxError):
    """The console is a websocket; a plain HTTP request was made."""

    code = "UpgradeRequired"
    http_status = 426


# -- jobs: locks, life cycle, children -----------------------------------------------------------

class TargetBusy(Conflict):
    """A job holds the lock on the target this request wants; `extra['job_id']` names it."""

    code = "TargetBusy"


class JobNotFound(NotFound):
    code = "JobNotFound"


class CheckNotFound(NotFound):
    """No `laxcluster check` has finished yet, so there is no report to show."""

    code = "CheckNotFound"


class JobFinished(Conflict):
    """The job already ended (e.g. it cannot be cancelled any more)."""

    code = "JobFinished"


class JobAlive(Conflict):
    """A job cannot be ended by force while a worker still runs it (cancel it normally)."""

    code = "JobAlive"


class ForceCancelled(LaxError):
    """An admin ended the job by force; its cleanup did not run."""

    code = "ForceCancelled"


class WorkerLost(LaxError):
    """The worker running the job died; the job's work was rolled back."""

    code = "WorkerLost"


class InternalError(LaxError):
    """Something unexpected failed; the detail hides internals, the log has them."""

    code = "InternalError"


class CleanupFailed(LaxError):
    """A job's cleanup (its undo) failed: something may be left behind."""

    code = "CleanupFailed"


class ChildFailed(LaxError):
    """A child job did not succeed; `extra` names it and its error code."""

    code = "ChildFailed"
    http_status = 502


class ChildrenTimedOut(LaxError):
    code = "ChildrenTimedOut"
    http_status = 504


class UnknownKind(InvalidInput):
    """A job was submitted with a kind no declaration in tasks.kinds names."""

    code = "UnknownKind"


# -- inventory: VMs, templates, cluster servers, SANs ---------------------------------------------

class VmExists(Conflict):
    code = "VmExists"


class VmNotFound(NotFound):
    code = "VmNotFound"


class VmNotPlaced(Conflict):
    """The VM is on no server."""

    code = "VmNotPlaced"


class VmIsRunning(Conflict):
    """The action needs the VM stopped first (rescue boots a stopped VM)."""

    code = "VmIsRunning"


class VmInRescue(Conflict):
    """The VM runs its rescue system: end the rescue first (`vm rescue NAME --end`)."""

    code = "VmInRescue"


class VmNotInRescue(Conflict):
    code = "VmNotInRescue"


class VmInMaintenance(Conflict):
    """The VM runs on its SAN host for maintenance: stop it there first (`vm shutdown` or `vm destroy`)."""

    code = "VmInMaintenance"


class NoSanHost(Conflict):
    """The VM's SAN has no libvirt of its own (`uri` in its config entry) to run VMs on for maintenance."""

    code = "NoSanHost"


class RescueUnavailable(Conflict):
    """The template `[templates] rescue` names is missing or has no kernel to boot."""

    code = "RescueUnavailable"


class VmBeingDeleted(Conflict):
    """The VM is being deleted (or a failed job left it to be deleted): nothing new starts on it."""

    code = "VmBeingDeleted"


class VmNotRunning(Conflict):
    code = "VmNotRunning"


class UnknownAction(NotFound):
    """The URL names an action a VM does not have."""

    code = "UnknownAction"


class TemplateNotFound(InvalidInput):
    """A request names a template that does not exist (at the site it needs one)."""

    code = "TemplateNotFound"


class TemplateExists(Conflict):
    code = "TemplateExists"


class ImportSourceRefused(InvalidInput):
    """A template's image is not a regular file inside the import directory (symlinks resolved first)."""

    code = "ImportSourceRefused"


class BackingFileRefused(InvalidInput):
    """A template's image names another file to read (a qcow2 backing or external data file)."""

    code = "BackingFileRefused"


class ServerNotFound(NotFound):
    """There is no such cluster server: the URL names it, or a job's parameter does."""

    code = "ServerNotFound"


class UnknownServer(InvalidInput):
    """A request body names a cluster server that does not exist."""

    code = "UnknownServer"


class ServerUnreachable(LaxError):
    """libvirt on a cluster server does not answer."""

    code = "ServerUnreachable"
    http_status = 502


class HypervisorUnknown(Conflict):
    """A server's hypervisor kind (kvm, qemu, xen) is not known yet: neither configured nor probed."""

    code = "HypervisorUnknown"


class RefreshFailed(LaxError):
    """Some servers' facts could not be refreshed; `extra['servers']` says which."""

    code = "RefreshFailed"
    http_status = 502


class ActivateFailed(LaxError):
    """A fenced server could not be re-admitted: its stale domains or its site's exports could not be put right."""

    code = "ActivateFailed"
    http_status = 502


class RecoveryIncomplete(LaxError):
    """A failed server was fenced but some of its VMs could not be restarted elsewhere; `extra['failed']` says which."""

    code = "RecoveryIncomplete"
    http_status = 503


class EvacuationIncomplete(Conflict):
    """Some VMs could not leave the server; `extra['failed']` says which and why."""

    code = "EvacuationIncomplete"


class SanNotFound(NotFound):
    code = "SanNotFound"


class UnknownSan(InvalidInput):
    """A request body names a SAN that does not exist."""

    code = "UnknownSan"


# -- IPAM: subnets and leases --------------------------------------------------------------------

class SubnetExists(Conflict):
    code = "SubnetExists"


class SubnetNotFound(NotFound):
    code = "SubnetNotFound"


class UnknownSubnet(InvalidInput):
    """A request body names a subnet that does not exist."""

    code = "UnknownSubnet"


class NoAddress(Conflict):
    """The subnet has no free IP address, or no free MAC is left under the prefix."""

    code = "NoAddress"


# -- placement -----------------------------------------------------------------------------------

class NoCapacity(Conflict):
    """No server has room for the VM; the message lists every server's numbers."""

    code = "NoCapacity"


class NoVmNetwork(Conflict):
    """The VM's subnet lives on a VM network that the server (or every server) has no bridge for."""

    code = "NoVmNetwork"


# -- libvirt domains and the serial console ------------------------------------------------------

class DomainNotFound(NotFound):
    code = "DomainNotFound"


class DomainFailed(LaxError):
    """libvirt refused or failed an operation on a domain."""

    code = "DomainFailed"
    http_status = 502


class ShutdownTimedOut(LaxError):
    code = "ShutdownTimedOut"
    http_status = 504


class ConsoleTimeout(LaxError):
    """The console did not show what was awaited in time; `extra['tail']` has its last output."""

    code = "ConsoleTimeout"
    http_status = 504


class ConsoleClosed(LaxError):
    code = "ConsoleClosed"
    http_status = 502


# -- migration -----------------------------------------------------------------------------------

class PreflightFailed(Conflict):
    """The migration cannot go ahead; `extra['problems']` lists every reason with what to do."""

    code = "PreflightFailed"


class MigrationFailed(LaxError):
    code = "MigrationFailed"
    http_status = 502


class MigrationAborted(Conflict):
    """A migration was cancelled; the domain keeps running on its source (the job ends `cancelled`)."""

    code = "MigrationAborted"


class SplitBrain(Conflict):
    """The domain runs on both servers at once: a person must decide which copy to keep."""

    code = "SplitBrain"


# -- storage: volumes on a SAN, resize and safe shrink -------------------------------------------

class VolumeNotFound(NotFound):
    code = "VolumeNotFound"


class VolumeExists(Conflict):
    code = "VolumeExists"


class VolumeBusy(Conflict):
    """The volume belongs to a running VM."""

    code = "VolumeBusy"


class NoSpace(LaxError):
    code = "NoSpace"
    http_status = 507


class InvalidName(InvalidInput):
    code = "InvalidName"


class InvalidSize(InvalidInput):
    code = "InvalidSize"


class UnknownBackend(InvalidInput):
    """A SAN's row names no volume backend we have (reflink with pool_path, or lvm with volume_group)."""

    code = "UnknownBackend"


class ShrinkRefused(Conflict):
    """A plain resize asked to shrink; only the safe shrink (workers.san.shrink) may."""

    code = "ShrinkRefused"


class UnknownFilesystem(Conflict):
    """Safe shrink found content it does not understand (only ext2/3/4 can be shrunk)."""

    code = "UnknownFilesystem"


class DataWouldNotFit(Conflict):
    """Safe shrink refused: the filesystem's data needs more room than the new size."""

    code = "DataWouldNotFit"


class FilesystemDamaged(Conflict):
    """e2fsck could not repair the filesystem; nothing was shrunk."""

    code = "FilesystemDamaged"


# -- iSCSI (tgt on the SAN) ----------------------------------------------------------------------

class InvalidIqn(InvalidInput):
    code = "InvalidIqn"


class TargetNotFound(NotFound):
    """The SAN exports no iSCSI target of that name."""

    code = "TargetNotFound"


class IscsiTargetBusy(Conflict):
    """The iSCSI target still has initiators logged in (not the job lock: that is TargetBusy)."""

    code = "IscsiTargetBusy"


class FenceFailed(LaxError):
    """An initiator still showed on a target (in its ACL or logged in) after it was fenced off."""

    code = "FenceFailed"
    http_status = 502


# -- backups: stores, chunks, manifests, policies ------------------------------------------------

class BackupNotFound(NotFound):
    code = "BackupNotFound"


class BackupCorrupt(Conflict):
    """Verify found chunks missing or corrupt; the backup is marked corrupt."""

    code = "BackupCorrupt"


class BackupMismatch(Conflict):
    """A differential's parent does not fit (other chunk size), ranges were given without a parent, or a
    backup names its chunks by a digest this version does not know."""

    code = "BackupMismatch"


class BackupCancelled(Conflict):
    """A backup, restore or verify stopped at a cancel check (the job ends `cancelled`)."""

    code = "Cancelled"


class ChunkMissing(NotFound):
    code = "ChunkMissing"


class ChunkCorrupt(LaxError):
    """A stored chunk does not decompress or hash to its name."""

    code = "ChunkCorrupt"
    http_status = 500


class ManifestNotFound(NotFound):
    code = "ManifestNotFound"


class InvalidStoreName(InvalidInput):
    """A chunk digest or backup id is not a name the store accepts."""

    code = "InvalidStoreName"


class InvalidRetention(InvalidInput):
    code = "InvalidRetention"


class InvalidStoreLocation(InvalidInput):
    code = "InvalidStoreLocation"


class StoreNotFound(NotFound):
    code = "StoreNotFound"


class UnknownStore(InvalidInput):
    """A request body names a backup store that does not exist."""

    code = "UnknownStore"


class StoreExists(Conflict):
    code = "StoreExists"


class StoreBusy(Conflict):
    """The store is being pruned; `extra['job_id']` names the job."""

    code = "StoreBusy"


class StoreUnreachable(LaxError):
    code = "StoreUnreachable"
    http_status = 502


class NoStoreChosen(InvalidInput):
    """No store was named and there is not exactly one."""

    code = "NoStoreChosen"


class UnknownStoreKind(InvalidInput):
    code = "UnknownStoreKind"


class NoDisks(Conflict):
    code = "NoDisks"


class DiskNotFound(NotFound):
    code = "DiskNotFound"


class BootDiskNotRemovable(Conflict):
    """The boot disk (and the seed) go only with the VM: delete the VM instead."""

    code = "BootDiskNotRemovable"


class TooManyDisks(Conflict):
    code = "TooManyDisks"


class VmNotStopped(Conflict):
    """An in-place restore or a shrink needs the VM shut down."""

    code = "VmNotStopped"


class PolicyExists(Conflict):
    code = "PolicyExists"


class PolicyNotFound(NotFound):
    code = "PolicyNotFound"


# -- lab: the cluster on one machine -------------------------------------------------------------

class LabError(LaxError):
    """The lab could not be brought up, inspected or torn down."""

    code = "LabError"


class LabTimeout(LabError):
    """Something the lab waited for did not happen in time."""

    code = "LabTimeout"


class TemplateBuildFailed(LaxError):
    """The lab's tiny template could not be built (e.g. no kernel with the modules it needs)."""

    code = "TemplateBuildFailed"


# -- API tokens -----------------------------------------------------------------------------------

class TokenExpired(Unauthorized):
    """The bearer token's `expires_at` has passed; `extra['token_id']` names it."""

    code = "TokenExpired"


class TokenRevoked(Unauthorized):
    """The bearer token was revoked; `extra['token_id']` names it."""

    code = "TokenRevoked"


class TokenNotFound(NotFound):
    code = "TokenNotFound"


# -- long-lived streams --------------------------------------------------------------------------

class TooManyStreams(ServiceUnavailable):
    """Every slot for long-lived streams (SSE, consoles) is taken; `extra['retry_after_s']` says when to retry."""

    code = "TooManyStreams"


# -- the launcher: `laxcluster run` ----------------------------------------------------------------

class LauncherRunning(Conflict):
    """Another `laxcluster run` holds this var_dir's launcher lock; `extra['pid']` is its pid."""

    code = "LauncherRunning"


# -- DR replication (control side) ---------------------------------------------------------------

class ReplicationNotEnabled(NotFound):
    """The VM has no replication to another site (`laxcluster dr enable`)."""

    code = "ReplicationNotEnabled"


class ReplicationExists(Conflict):
    code = "ReplicationExists"


class NoDrSite(Conflict):
    """The asked DR site is the VM's own, unknown, or has no SAN or servers to take the VM."""

    code = "NoDrSite"


class NoReplicaPoint(Conflict):
    """No consistent replica of the VM is on the peer SAN yet (or not the one asked for)."""

    code = "NoReplicaPoint"


class NotPrimary(Conflict):
    """The VM's primary copy is at another site (after a failover): this site must not start or export it."""

    code = "NotPrimary"


class DrillFailed(LaxError):
    """A DR drill's replica did not come up at the DR site (its detail says what the console showed)."""

    code = "DrillFailed"
    http_status = 502


# -- DR replication (the bulk data between SANs) -------------------------------------------------

class PeerUnreachable(LaxError):
    """The peer SAN host's sshd cannot be reached or logged in to (or its host key is not the known one)."""

    code = "PeerUnreachable"
    http_status = 502


class ReplicationBroken(LaxError):
    """A ship broke off (stream cut, checksum mismatch, receiver failed): the peer made no new point."""

    code = "ReplicationBroken"
    http_status = 502


class ReplicaBaseMissing(Conflict):
    """The peer no longer has the base point a delta was made against: ship everything again."""

    code = "ReplicaBaseMissing"


class ReplicationCancelled(Conflict):
    """A ship stopped at a cancel check before its commit: the peer made no new point."""

    code = "ReplicationCancelled"
