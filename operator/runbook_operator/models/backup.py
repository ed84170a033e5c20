"""BackupPolicy and BackupRestore: the runbook's "Backup & Recovery" section."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from .common import DNS_LABEL, CamelModel, Cron, Duration, ObjectName, StatusBase, StatusModel, TimeZone, WorkloadRef
from .sources import Encryption, PostgresConnection, RedisConnection, S3Location

# The resources a Kubernetes export may name: plural -> (API group, version, kind). A closed list, so the
# CRD rejects typos and the export's Role grants read access to exactly these and nothing else.
KUBERNETES_RESOURCES: dict[str, tuple[str, str, str]] = {
    "deployments": ("apps", "v1", "Deployment"),
    "statefulsets": ("apps", "v1", "StatefulSet"),
    "daemonsets": ("apps", "v1", "DaemonSet"),
    "services": ("", "v1", "Service"),
    "configmaps": ("", "v1", "ConfigMap"),
    "serviceaccounts": ("", "v1", "ServiceAccount"),
    "persistentvolumeclaims": ("", "v1", "PersistentVolumeClaim"),
    "ingresses": ("networking.k8s.io", "v1", "Ingress"),
    "networkpolicies": ("networking.k8s.io", "v1", "NetworkPolicy"),
    "horizontalpodautoscalers": ("autoscaling", "v2", "HorizontalPodAutoscaler"),
    "cronjobs": ("batch", "v1", "CronJob"),
    "poddisruptionbudgets": ("policy", "v1", "PodDisruptionBudget"),
    "roles": ("rbac.authorization.k8s.io", "v1", "Role"),
    "rolebindings": ("rbac.authorization.k8s.io", "v1", "RoleBinding"),
    "secrets": ("", "v1", "Secret"),
}
KubernetesResource = Literal[
    "deployments",
    "statefulsets",
    "daemonsets",
    "services",
    "configmaps",
    "serviceaccounts",
    "persistentvolumeclaims",
    "ingresses",
    "networkpolicies",
    "horizontalpodautoscalers",
    "cronjobs",
    "poddisruptionbudgets",
    "roles",
    "rolebindings",
]

DEFAULT_RESOURCES: tuple[KubernetesResource, ...] = (
    "deployments",
    "statefulsets",
    "services",
    "configmaps",
    "ingresses",
    "networkpolicies",
    "horizontalpodautoscalers",
    "cronjobs",
    "serviceaccounts",
    "persistentvolumeclaims",
)


class KubernetesSource(CamelModel):
    """Export Kubernetes objects as YAML (the runbook's daily config export)."""

    namespaces: list[Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]] = Field(
        description="Namespaces to export.", min_length=1, max_length=32
    )
    resources: list[KubernetesResource] = Field(
        default_factory=lambda: list(DEFAULT_RESOURCES),
        description="Resource plurals to export (e.g. deployments, configmaps); Secrets only via includeSecrets.",
        min_length=1,
    )
    include_secrets: bool = Field(False, description="Also export Secrets (only ever stored encrypted).")

    @property
    def exported(self) -> list[str]:
        """The resource plurals the export reads, Secrets last when asked for."""
        return list(dict.fromkeys(self.resources)) + (["secrets"] if self.include_secrets else [])


class BackupSource(CamelModel):
    """What to back up: exactly one of postgresql, redis, kubernetes."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.postgresql), has(self.redis), has(self.kubernetes)].filter(x, x).size() == 1",
                    "message": "set exactly one of postgresql, redis, kubernetes",
                }
            ]
        }
    )

    postgresql: PostgresConnection | None = Field(None, description="A PostgreSQL database (pg_dump -Fc).")
    redis: RedisConnection | None = Field(None, description="A Redis server (BGSAVE, then its RDB file).")
    kubernetes: KubernetesSource | None = Field(None, description="Kubernetes objects exported as YAML.")

    @model_validator(mode="after")
    def _exactly_one(self) -> BackupSource:
        chosen = [n for n in ("postgresql", "redis", "kubernetes") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of postgresql, redis, kubernetes (got {chosen or 'none'})")
        return self

    @property
    def kind(self) -> str:
        """The name of the source that is set."""
        return next(n for n in ("postgresql", "redis", "kubernetes") if getattr(self, n) is not None)


class Destination(CamelModel):
    """Where backups are stored."""

    s3: S3Location = Field(description="An S3 bucket.")


class Retention(CamelModel):
    """How long backups are kept."""

    max_age: Duration | None = Field(None, description="Delete backups older than this (e.g. 7y, 30d, 1y).")
    min_keep: int = Field(3, description="Never keep fewer than this many complete backups.", ge=1, le=10000)


class BackupPolicySpec(CamelModel):
    """A scheduled, encrypted backup of one source to S3."""

    source: BackupSource = Field(description="What to back up.")
    schedule: Cron = Field(description="When to back up (cron), e.g. '0 */6 * * *' for every 6 hours.")
    time_zone: TimeZone = Field("UTC", description="Time zone of the schedule.")
    suspend: bool = Field(False, description="Pause scheduled backups.")
    destination: Destination = Field(description="Where backups go.")
    encryption: Encryption = Field(description="How backups are encrypted before they leave the pod.")
    retention: Retention = Field(default_factory=Retention, description="How long backups are kept.")
    concurrency_policy: Literal["Forbid", "Replace"] = Field(
        "Forbid", description="What to do when a run is still going at the next schedule."
    )
    backoff_limit: int = Field(2, description="Retries of a failed run.", ge=0, le=10)
    active_deadline_seconds: int = Field(6 * 3600, description="A run is stopped after this long.", ge=60)
    starting_deadline_seconds: int = Field(
        600, description="A run missed by more than this is skipped (at most one catch-up after an outage).", ge=10
    )
    deletion_policy: Literal["Retain", "Delete"] = Field(
        "Retain", description="Retain: deleting the policy keeps its backups. Delete: removes them too."
    )


class BackupRecord(StatusModel):
    """A complete backup (its manifest exists)."""

    time: str | None = Field(None, description="When the backup finished (RFC 3339).")
    key: str | None = Field(None, description="Key prefix of the backup in the bucket.")
    size_bytes: int | None = Field(None, description="Size of the encrypted object.")
    sha256: str | None = Field(None, description="SHA-256 of the encrypted object.")
    job: str | None = Field(None, description="The Job that made it.")


class FailureRecord(StatusModel):
    """The last failed run."""

    time: str | None = Field(None, description="When the failure was seen (RFC 3339).")
    reason: str | None = Field(None, description="A CamelCase reason.")
    message: str | None = Field(None, description="What went wrong.")
    job: str | None = Field(None, description="The Job that failed, if a Job ran.")


class BackupPolicyStatus(StatusBase):
    """Observed state of a BackupPolicy."""

    source_kind: str | None = Field(None, description="postgresql, redis or kubernetes.")
    cron_job_name: str | None = Field(None, description="The owned CronJob.")
    last_schedule_time: str | None = Field(None, description="When a run was last started.")
    last_successful_backup: BackupRecord | None = Field(None, description="The newest complete backup.")
    last_failure: FailureRecord | None = Field(None, description="The newest failed run.")
    backup_now: str | None = Field(None, description="The last backup-now annotation value acted on.")


class BackupRestoreSpec(CamelModel):
    """A one-off restore of a PostgreSQL backup made by a BackupPolicy."""

    policy_ref: ObjectName = Field(description="Name of the BackupPolicy whose backups to restore.")
    backup: str = Field("latest", description="'latest' or the key of a backup.", min_length=1)
    target: PostgresConnection | None = Field(None, description="Where to restore; the policy's source when absent.")
    scale_down: list[WorkloadRef] = Field(
        default_factory=list,
        description="Workloads stopped during the restore; their replica counts are recorded and restored.",
    )
    dry_run: bool = Field(False, description="Only verify the backup (checksum, decrypt, pg_restore --list).")


class RestoreStep(StatusModel):
    """One step of a restore."""

    name: str = Field(description="Step name.")
    phase: str = Field(description="Running, Succeeded, Failed or Skipped.")
    start_time: str | None = Field(None, description="When the step started.")
    end_time: str | None = Field(None, description="When the step ended.")
    message: str | None = Field(None, description="What happened.")


class ReplicaRecord(StatusModel):
    """A workload's replica count recorded before it was changed."""

    kind: str = Field(description="Deployment or StatefulSet.")
    name: str = Field(description="Workload name.")
    replicas: int = Field(description="Replicas before the change.")


class BackupRestoreStatus(StatusBase):
    """Observed state of a BackupRestore."""

    backup_key: str | None = Field(None, description="The backup being restored.")
    steps: list[RestoreStep] = Field(default_factory=list, description="The restore's timeline.")
    scaled_down: list[ReplicaRecord] = Field(default_factory=list, description="Recorded replica counts.")
    job_name: str | None = Field(None, description="The restore Job.")
