"""The inventory: SQLAlchemy 2 typed models of everything LaxCluster manages."""

from models.access import ROLES, ApiToken, AuditEvent
from models.base import Base, new_id, utcnow
from models.compute import Template, VirtualMachine, Volume
from models.ipam import Lease, Subnet
from models.jobs import CANCELLED, FAILED, FINAL_STATES, QUEUED, RUNNING, STATES, SUCCEEDED, Job, JobLock
from models.protection import Backup, BackupPolicy, BackupStore, ReplicaDisk, ReplicaPoint, Replication
from models.topology import Cluster, ClusterServer, San, Site

__all__ = [
    "ROLES", "ApiToken", "AuditEvent", "Base", "new_id", "utcnow", "Template", "VirtualMachine",
    "Volume", "Lease", "Subnet", "CANCELLED", "FAILED", "FINAL_STATES", "QUEUED", "RUNNING",
    "STATES", "SUCCEEDED", "Job", "JobLock", "Backup", "BackupPolicy", "BackupStore",
    "ReplicaDisk", "ReplicaPoint", "Replication", "Cluster", "ClusterServer", "San", "Site",
]
