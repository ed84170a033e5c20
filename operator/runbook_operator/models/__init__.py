"""The API: one pydantic model per spec and status, and the registry of kinds that crdgen turns into CRDs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .backup import BackupPolicySpec, BackupPolicyStatus, BackupRestoreSpec, BackupRestoreStatus
from .common import CamelModel, Condition, StatusBase
from .grants import RunbookGrantSpec, RunbookGrantStatus
from .isolation import EmergencyIsolationSpec, EmergencyIsolationStatus
from .rotation import SecretRotationSpec, SecretRotationStatus
from .scaling import ScalingProfileSpec, ScalingProfileStatus

GROUP = "runbook.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "runbook"


@dataclass(frozen=True)
class PrinterColumn:
    """One column of ``kubectl get``."""

    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


READY = PrinterColumn("Ready", '.status.conditions[?(@.type=="Ready")].status', description="Ready condition")
AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date")


@dataclass(frozen=True)
class Kind:
    """A custom resource kind and everything crdgen needs to describe it."""

    kind: str
    plural: str
    short_name: str
    description: str
    spec: type[CamelModel]
    status: type[StatusBase]
    columns: tuple[PrinterColumn, ...] = field(default=())
    scope: Literal["Namespaced", "Cluster"] = "Namespaced"
    # `kubectl get runbook` lists every kind of the category: a kind namespace users may not list stays out,
    # or their `kubectl get runbook -n NS` fails with Forbidden.
    categories: tuple[str, ...] = (CATEGORY,)

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


KINDS: tuple[Kind, ...] = (
    Kind(
        "BackupPolicy",
        "backuppolicies",
        "bp",
        "A scheduled, GPG-encrypted backup of PostgreSQL, Redis or Kubernetes objects to S3, with retention.",
        BackupPolicySpec,
        BackupPolicyStatus,
        (
            PrinterColumn("Source", ".status.sourceKind", description="What is backed up"),
            PrinterColumn("Schedule", ".spec.schedule"),
            PrinterColumn("Last Success", ".status.lastSuccessfulBackup.time", "date"),
            PrinterColumn("Size", ".status.lastSuccessfulBackup.sizeBytes", "integer"),
            # a date column shows its age: how far back a point-in-time restore can go (e.g. 6d23h)
            PrinterColumn(
                "WAL Window",
                ".status.wal.earliestRecoverableTime",
                "date",
                "How far back a point-in-time restore can go (spec.wal)",
            ),
            READY,
            AGE,
        ),
    ),
    Kind(
        "BackupRestore",
        "backuprestores",
        "br",
        "A verified restore of a PostgreSQL backup, stopping and restarting dependent workloads.",
        BackupRestoreSpec,
        BackupRestoreStatus,
        (
            PrinterColumn("Policy", ".spec.policyRef"),
            PrinterColumn("Backup", ".status.backupKey"),
            PrinterColumn("Phase", ".status.phase"),
            READY,
            AGE,
        ),
    ),
    Kind(
        "SecretRotation",
        "secretrotations",
        "sr",
        "Crash-safe rotation of a password in a Secret, in PostgreSQL or Redis, with a rollout restart.",
        SecretRotationSpec,
        SecretRotationStatus,
        (
            PrinterColumn("Secret", ".spec.secretRef.name"),
            PrinterColumn("Target", ".status.targetKind"),
            PrinterColumn("Last Rotation", ".status.lastRotationTime", "date"),
            PrinterColumn("Next", ".status.nextRotationTime"),
            READY,
            AGE,
        ),
    ),
    Kind(
        "EmergencyIsolation",
        "emergencyisolations",
        "ei",
        "Contain a namespace during a suspected breach: deny-all network policy, evidence, scale to zero.",
        EmergencyIsolationSpec,
        EmergencyIsolationStatus,
        (
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Severity", ".spec.severity"),
            PrinterColumn("Incident", ".spec.incidentId"),
            PrinterColumn("Scaled", ".status.scaled"),
            PrinterColumn("Evidence", ".status.evidence.key", priority=0),
            AGE,
        ),
    ),
    Kind(
        "ScalingProfile",
        "scalingprofiles",
        "sp",
        "How one workload scales: an HPA, container resources, scheduled windows and temporary overrides.",
        ScalingProfileSpec,
        ScalingProfileStatus,
        (
            PrinterColumn("Target", ".spec.targetRef.name"),
            PrinterColumn("Min", ".status.minReplicas", "integer"),
            PrinterColumn("Max", ".status.maxReplicas", "integer"),
            PrinterColumn("Window", ".status.activeWindow"),
            READY,
            AGE,
        ),
    ),
    Kind(
        "RunbookGrant",
        "runbookgrants",
        "rgrant",
        "A cluster administrator's grant: what the runbook.dev objects of some namespaces may reach beyond their "
        "own namespace (S3 endpoints and buckets, ambient S3 credentials, hosts, exported namespaces, plaintext).",
        RunbookGrantSpec,
        RunbookGrantStatus,
        (
            PrinterColumn("Namespaces", ".spec.namespaces", description="The tenant namespaces it applies to"),
            PrinterColumn("Hosts", ".spec.hosts[*].host", description="Servers allowed beyond own Services"),
            PrinterColumn("S3", ".spec.s3[*].endpoint", description="Custom S3 endpoints allowed"),
            PrinterColumn("Exports", ".spec.exportNamespaces", description="Other namespaces that may be exported"),
            PrinterColumn("Plaintext", ".spec.plaintextConnections", "boolean", "Connections without TLS allowed"),
            AGE,
        ),
        scope="Cluster",
        categories=(),
    ),
)

KINDS_BY_NAME = {k.kind: k for k in KINDS}

__all__ = ["API_VERSION", "CATEGORY", "GROUP", "KINDS", "KINDS_BY_NAME", "VERSION", "Condition", "Kind"]
