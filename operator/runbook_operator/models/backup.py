"""BackupPolicy and BackupRestore: the runbook's "Backup & Recovery" section."""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.alias_generators import to_snake

from .common import (
    DNS_LABEL,
    CamelModel,
    CredentialsSecretRef,
    Cron,
    Duration,
    ObjectName,
    Port,
    SecretKeyRef,
    StatusBase,
    StatusModel,
    TimeZone,
    WorkloadRef,
    cel,
)
from .sources import Encryption, PostgresConnection, RedisConnection, RedisTLS, S3Location

# Any new value of this annotation on a BackupPolicy starts one backup now (the value acts once).
BACKUP_NOW = "runbook.dev/backup-now"

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
        json_schema_extra=cel(
            (
                "[has(self.postgresql), has(self.redis), has(self.kubernetes)].filter(x, x).size() == 1",
                "set exactly one of postgresql, redis, kubernetes",
            ),
        )
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


class RedisRestoreTarget(CamelModel):
    """The Redis a Redis backup is restored into: each field left out is the policy's Redis source's."""

    host: str | None = Field(None, description="Server host; the source's when absent.", min_length=1, max_length=253)
    port: Port | None = Field(None, description="Server port; the source's when absent.")
    tls: RedisTLS | None = Field(None, description="TLS settings; the source's when absent.")
    username: str | None = Field(None, description="ACL user (needs FLUSHALL, RESTORE, SCAN, INFO).", min_length=1)
    password_secret_ref: SecretKeyRef | None = Field(None, description="Password; the source's when absent.")

    def resolve(self, source: RedisConnection) -> RedisConnection:
        """The full connection: these fields over the source's."""
        return source.model_copy(update={k: v for k, v in self if v is not None})


class RestoreTarget(CamelModel):
    """Where a restore writes: each field left out is taken from the policy's PostgreSQL source (for a Redis
    backup: only ``redis``, over the policy's Redis source)."""

    host: str | None = Field(None, description="Server host; the source's when absent.", min_length=1, max_length=253)
    port: Port | None = Field(None, description="Server port; the source's when absent.")
    database: str | None = Field(None, description="Database; the source's when absent.", min_length=1, max_length=63)
    credentials_secret_ref: CredentialsSecretRef | None = Field(
        None, description="Login allowed to drop and create the database's objects; the source's when absent."
    )
    redis: RedisRestoreTarget | None = Field(
        None, description="For a Redis backup: the Redis restored into (FLUSHALL, then every key of the backup)."
    )

    def resolve(self, source: PostgresConnection) -> PostgresConnection:
        """The full connection: these fields over the source's."""
        return source.model_copy(update={k: v for k, v in self if v is not None and k != "redis"})

    @property
    def postgresql_fields(self) -> list[str]:
        """The PostgreSQL fields that are set (camelCase)."""
        names = ("database", "credentialsSecretRef", "host", "port")
        return [name for name in names if getattr(self, to_snake(name)) is not None]


class Verification(CamelModel):
    """Restore drills: the newest backup is restored into a scratch database on a schedule and checked."""

    schedule: Cron = Field(description="When to run a drill (cron), e.g. '0 4 * * 0' for Sundays at 04:00.")
    time_zone: TimeZone = Field("UTC", description="Time zone of the schedule.")
    target: RestoreTarget = Field(description="The scratch database (never the source) drills restore into.")
    decryption_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the ASCII-armored private key; needed when encrypting to public keys."
    )


SLOT_NAME = r"^[a-z0-9_]{1,63}$"


class WALBaseBackups(CamelModel):
    """The base backups a WAL chain starts from: ``pg_basebackup`` (tar to stdout) through gpg to the bucket."""

    schedule: Cron | None = Field(
        None, description="When to take a base backup (cron); the policy's schedule when absent (e.g. every 6 hours)."
    )
    time_zone: TimeZone = Field("UTC", description="Time zone of the schedule.")


class WALArchiving(CamelModel):
    """Continuous archiving of a PostgreSQL server's WAL (the runbook's "PostgreSQL WAL, continuous, 7 days"),
    from the outside, as a login with REPLICATION could: a receiver the operator owns streams WAL over the
    replication protocol through a physical replication slot and ships each segment, encrypted, to the bucket;
    base backups start the chain; a BackupRestore with ``pointInTime`` recovers to any moment of the window."""

    enabled: bool = Field(True, description="Stream and archive WAL (false keeps the archive, stops the receiver).")
    retention: Duration = Field(
        "7d",
        description="The recovery window: every base backup and WAL segment needed to reach any point this far "
        "back is kept, the rest removed (the runbook's 7 days).",
    )
    replication_credentials_secret_ref: CredentialsSecretRef = Field(
        description="Secret with a login that has the REPLICATION attribute (and nothing more is needed)."
    )
    slot_name: str | None = Field(
        None,
        description="The physical replication slot; runbook_<namespace>_<policy> (shortened) when absent. A slot "
        "of that name the operator did not create is refused (SlotTaken).",
        pattern=SLOT_NAME,
    )
    base_backups: WALBaseBackups = Field(
        default_factory=WALBaseBackups, description="When base backups are taken (the policy's schedule by default)."
    )
    ship_interval_seconds: int = Field(
        2,
        description="How often the segment being written is shipped too, so a commit is recoverable from the "
        "bucket within about this long (the RPO).",
        ge=1,
        le=300,
    )
    receiver_gone_seconds: int = Field(
        600,
        description="A slot whose receiver has been away longer than this sets WALArchiving=False (SlotInactive): "
        "the server keeps WAL for it and its disk fills.",
        ge=60,
    )


class BackupPolicySpec(CamelModel):
    """A scheduled, encrypted backup of one source to S3."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.verification) || has(self.source.postgresql) || has(self.source.redis)",
                "verification: restore drills need a postgresql or redis source",
            ),
            (
                "!has(self.verification) || !has(self.source.redis) || (has(self.verification.target.redis) && ("
                "(has(self.verification.target.redis.host) && "
                "self.verification.target.redis.host != self.source.redis.host) || "
                "(has(self.verification.target.redis.port) && "
                "self.verification.target.redis.port != self.source.redis.port)))",
                "verification.target.redis: must name a scratch Redis, not the source",
            ),
            (
                "!has(self.verification) || !has(self.source.postgresql) || "
                "(has(self.verification.target.database) && "
                "self.verification.target.database != self.source.postgresql.database) || "
                "(has(self.verification.target.host) && "
                "self.verification.target.host != self.source.postgresql.host) || "
                "(has(self.verification.target.port) && "
                "self.verification.target.port != self.source.postgresql.port)",
                "verification.target: must name a scratch database, not the source database",
            ),
            ("!has(self.wal) || has(self.source.postgresql)", "wal: continuous archiving needs a postgresql source"),
            (
                "!has(self.verification) || has(self.encryption.gpg.passphraseSecretRef) || "
                "has(self.verification.decryptionSecretRef)",
                "verification.decryptionSecretRef: backups are encrypted to public keys; name the private key",
            ),
        )
    )

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
    verification: Verification | None = Field(
        None, description="Scheduled restore drills into a scratch database (PostgreSQL sources only)."
    )
    wal: WALArchiving | None = Field(
        None, description="Continuous WAL archiving and point-in-time recovery (PostgreSQL sources only)."
    )

    @model_validator(mode="after")
    def _wal_needs_postgresql(self) -> BackupPolicySpec:
        if self.wal is not None and self.source.postgresql is None:
            raise ValueError("wal: continuous archiving needs a postgresql source")
        return self

    @model_validator(mode="after")
    def _drills_need_a_scratch_database(self) -> BackupPolicySpec:
        if self.verification is None:
            return self
        if self.source.redis is not None:
            scratch = self.verification.target.redis
            chosen = scratch.resolve(self.source.redis) if scratch is not None else self.source.redis
            if scratch is None or (chosen.host, chosen.port) == (self.source.redis.host, self.source.redis.port):
                raise ValueError("verification.target.redis: must name a scratch Redis, not the source")
        source = self.source.postgresql
        if source is None and self.source.redis is None:
            raise ValueError("verification: restore drills need a postgresql or redis source")
        if source is not None:
            target = self.verification.target.resolve(source)
            if (target.host, target.port, target.database) == (source.host, source.port, source.database):
                raise ValueError("verification.target: must name a scratch database, not the source database")
        if self.encryption.gpg.passphrase_secret_ref is None and self.verification.decryption_secret_ref is None:
            raise ValueError(
                "verification.decryptionSecretRef: backups are encrypted to public keys; name the private key"
            )
        return self


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


class VerifiedBackup(StatusModel):
    """A backup that was restored and whose contents matched its manifest."""

    key: str | None = Field(None, description="Key of the backup's data object.")
    backup_time: str | None = Field(None, description="When the backup finished (RFC 3339).")
    verified_time: str | None = Field(None, description="When the drill's checks passed (RFC 3339).")
    restore: str | None = Field(None, description="The BackupRestore that ran the drill.")
    tables: int | None = Field(None, description="Tables found, as many as the manifest recorded.")
    rows: int | None = Field(None, description="Rows found in those tables, as many as the manifest recorded.")
    keys: int | None = Field(None, description="Redis: keys restored, as the manifest's keyspace recorded.")


class WALStatus(StatusModel):
    """The WAL archive: what is safe in the bucket and how far back a restore can go."""

    slot_name: str | None = Field(None, description="The physical replication slot the receiver streams from.")
    receiver: str | None = Field(None, description="The owned receiver Deployment.")
    base_backup_cron_job: str | None = Field(None, description="The owned CronJob taking base backups.")
    timeline: int | None = Field(None, description="The timeline being archived.")
    last_archived_lsn: str | None = Field(None, description="The newest LSN shipped to the bucket (e.g. 0/3000148).")
    last_archived_time: str | None = Field(None, description="When it was shipped (RFC 3339).")
    last_base_backup: str | None = Field(None, description="Folder of the newest complete base backup.")
    base_backups: int | None = Field(None, description="Complete base backups in the bucket.")
    segments: int | None = Field(None, description="WAL segments in the bucket.")
    earliest_recoverable_time: str | None = Field(
        None, description="The oldest point a point-in-time restore can reach (RFC 3339)."
    )
    latest_recoverable_time: str | None = Field(
        None, description="The newest point a point-in-time restore can reach (RFC 3339)."
    )
    window_seconds: int | None = Field(None, description="latest - earliest, in seconds.")
    slot_retained_bytes: int | None = Field(
        None, description="WAL the server keeps for the slot (current LSN - the slot's restart LSN)."
    )
    slot_active: bool | None = Field(None, description="Whether a receiver is connected to the slot.")


class BackupPolicyPhase(enum.StrEnum):
    """A BackupPolicy's phase."""

    SCHEDULED = "Scheduled"  # the CronJob runs on the schedule
    SUSPENDED = "Suspended"  # the CronJob exists, scheduled runs are paused
    BLOCKED = "Blocked"  # a reference, the bucket or the API server stands in the way (Ready says which)
    INVALID = "Invalid"  # the spec is invalid (Ready names the field)


class BackupPolicyStatus(StatusBase):
    """Observed state of a BackupPolicy."""

    phase: BackupPolicyPhase | None = Field(None, description="Scheduled, Suspended, Blocked or Invalid.")
    source_kind: str | None = Field(None, description="postgresql, redis or kubernetes.")
    cron_job_name: str | None = Field(None, description="The owned CronJob.")
    last_schedule_time: str | None = Field(None, description="When a run was last started.")
    last_successful_backup: BackupRecord | None = Field(None, description="The newest complete backup.")
    last_failure: FailureRecord | None = Field(None, description="The newest failed run.")
    backup_now: str | None = Field(None, description="The last backup-now annotation value acted on.")
    last_verified_backup: VerifiedBackup | None = Field(
        None, description="The newest backup a restore drill restored and checked (retention keeps it)."
    )
    wal: WALStatus | None = Field(None, description="The WAL archive and the recoverable window (spec.wal).")


class RestoreRoles(CamelModel):
    """Who owns the restored objects and who may use them (pg_restore's --no-owner and --no-privileges)."""

    owners: Literal["Keep", "Skip"] = Field(
        "Keep",
        description="Keep: each object gets its backed-up owner (the target login must be a member of each owner "
        "role). Skip: pg_restore --no-owner, the target login owns everything.",
    )
    privileges: Literal["Keep", "Skip"] = Field(
        "Keep",
        description="Keep: the backed-up GRANTs and REVOKEs are restored (every grantee role must exist). "
        "Skip: pg_restore --no-privileges.",
    )
    create_missing: bool = Field(
        False,
        description="Before restoring, create the backed-up roles the target server lacks (the login needs "
        "CREATEROLE): without a password, with LOGIN, INHERIT and CONNECTION LIMIT as backed up and never "
        "SUPERUSER, CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS; memberships only among the created roles.",
    )


class KubernetesRestore(CamelModel):
    """Which section of a Kubernetes export to re-apply, where, and what to do with objects that differ."""

    namespace: str | None = Field(
        None,
        description="The exported namespace whose section is re-applied (its '# namespace: NAME' section); the "
        "BackupRestore's own namespace when absent.",
        pattern=DNS_LABEL,
        max_length=63,
    )
    target_namespace: str | None = Field(
        None,
        description="Where the section is applied: only the BackupRestore's own namespace (the default) is "
        "allowed, since writing into another namespace needs a grant no namespace user can make.",
        pattern=DNS_LABEL,
        max_length=63,
    )
    include_secrets: bool = Field(
        False, description="Also re-apply the section's Secrets (the backup must have them: includeSecrets)."
    )
    conflicts: Literal["Skip", "Replace"] = Field(
        "Skip",
        description="Objects that exist and differ from the backup: Skip reports them and leaves them alone; "
        "Replace applies the backed-up object over them (server-side apply with force).",
    )


class NewVolume(CamelModel):
    """A PersistentVolumeClaim a point-in-time restore creates and fills (left for the user, never deleted)."""

    name: ObjectName = Field(description="Name of the claim to create; refused when it exists.")
    size: str = Field(description="Requested storage, e.g. 50Gi.", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)$")
    storage_class_name: ObjectName | None = Field(None, description="Storage class; the cluster default when absent.")


class PointInTime(CamelModel):
    """Recover a PostgreSQL server to a moment of its policy's WAL window: the newest base backup before it, and
    the WAL from there to exactly that point (``recovery_target_time`` / ``recovery_target_lsn``, then
    promote). Refused before anything is touched when the point is outside the window or the chain has a
    gap (the missing range is named)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "[has(self.targetTime), has(self.targetLSN), has(self.latest) && self.latest].filter(x, x).size() == 1",
                "set exactly one of targetTime, targetLSN and latest: true",
            ),
            ("self.mode != 'NewVolume' || has(self.newVolume)", "mode NewVolume needs newVolume"),
        )
    )

    target_time: str | None = Field(
        None,
        description="Recover through this moment (RFC 3339 with a zone, e.g. 2026-12-01T17:58:00Z).",
        json_schema_extra={"format": "date-time"},
    )
    target_lsn: str | None = Field(
        None,
        alias="targetLSN",
        description="Recover through this WAL location (e.g. 0/3000148).",
        pattern=r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$",
    )
    latest: bool | None = Field(None, description="Recover through the newest WAL in the bucket.")
    mode: Literal["InPlace", "NewVolume"] = Field(
        "InPlace",
        description="InPlace: the StatefulSet is scaled to 0, its data directory is replaced (the old one kept "
        "beside it) and it is scaled back to its exact count. NewVolume: a new PersistentVolumeClaim gets the "
        "recovered data directory for you to mount; nothing running is touched.",
    )
    stateful_set: ObjectName = Field(
        "postgresql", description="InPlace: the server's StatefulSet (the runbook's postgresql)."
    )
    volume_claim: ObjectName | None = Field(
        None,
        description="InPlace: the claim holding the data directory; data-<statefulSet>-0 when absent "
        "(the runbook's data-postgresql-0).",
    )
    data_directory: str = Field(
        "pgdata",
        description="The data directory's path inside the volume.",
        pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$",
        max_length=255,
    )
    new_volume: NewVolume | None = Field(None, description="NewVolume: the claim to create.")

    @model_validator(mode="after")
    def _one_point(self) -> PointInTime:
        if [self.target_time is not None, self.target_lsn is not None, bool(self.latest)].count(True) != 1:
            raise ValueError("pointInTime: set exactly one of targetTime, targetLSN and latest: true")
        if self.mode == "NewVolume" and self.new_volume is None:
            raise ValueError("pointInTime.newVolume: mode NewVolume needs newVolume")
        return self


class BackupRestoreSpec(CamelModel):
    """A one-off restore of a backup made by a BackupPolicy (immutable: create a new one to retry)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("self == oldSelf", "spec is immutable: create a new BackupRestore instead"),
        )
    )

    policy_ref: ObjectName = Field(description="Name of the BackupPolicy whose backups to restore.")
    backup: str = Field(
        "latest",
        description="'latest', a backup's folder (its UTC timestamp, e.g. 20260101T030000Z) or its data object key.",
        min_length=1,
        max_length=1024,
    )
    target: RestoreTarget | None = Field(
        None, description="Where to restore; each field left out is the policy's source's (e.g. only a database)."
    )
    decryption_secret_ref: SecretKeyRef | None = Field(
        None,
        description="Secret key holding the ASCII-armored private key; needed when the policy encrypts to public keys "
        "(a symmetric policy's passphrase Secret is used otherwise).",
    )
    scale_down: list[WorkloadRef] = Field(
        default_factory=list,
        description="Workloads stopped during the restore; their replica counts are recorded and restored.",
        max_length=32,
    )
    roles: RestoreRoles = Field(
        default_factory=RestoreRoles,
        description="Owners and privileges as backed up (the default: an in-place restore keeps who owns and may "
        "use what), or skipped; createMissing makes a restore into an empty server work.",
    )
    kubernetes: KubernetesRestore | None = Field(
        None, description="For a Kubernetes export: the section to re-apply and how (the defaults when absent)."
    )
    point_in_time: PointInTime | None = Field(
        None,
        description="A point-in-time recovery from the policy's WAL archive (spec.wal) instead of a logical "
        "restore of one dump; backup is then ignored.",
    )
    dry_run: bool = Field(
        False,
        description="Only verify the backup (checksum, decrypt, pg_restore --list, target); for a Kubernetes export "
        "also the API server's dry run of every object, summarised in status.kubernetes.",
    )
    scale_timeout_seconds: int = Field(
        300, description="How long to wait for the workloads to stop, and to be available again.", ge=10, le=3600
    )
    allow_unsigned_backup: bool = Field(
        False,
        description="Restore a backup whose manifest has no signature (one made before the operator signed "
        "manifests): the condition ManifestVerified=False (UnsignedBackupAllowed) and a Warning Event say so. "
        "A signed manifest is always verified, and a drill never accepts an unsigned one.",
    )


class RestorePhase(enum.StrEnum):
    """A BackupRestore's phase: the step running (Preflight ... ScalingUp), or how it ended."""

    PREFLIGHT = "Preflight"
    SCALING_DOWN = "ScalingDown"
    RESTORING = "Restoring"
    CHECKING = "Checking"
    SCALING_UP = "ScalingUp"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    DRY_RUN_SUCCEEDED = "DryRunSucceeded"


RESTORE_ENDED = (RestorePhase.SUCCEEDED, RestorePhase.FAILED, RestorePhase.DRY_RUN_SUCCEEDED)


class RestoreStepName(enum.StrEnum):
    """The steps of a restore, in their order."""

    PREFLIGHT = "Preflight"
    SCALE_DOWN = "ScaleDown"
    RESTORE = "Restore"
    CHECK = "Check"
    SCALE_UP = "ScaleUp"


class StepPhase(enum.StrEnum):
    """Where one step of a restore is."""

    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class RestoreStep(StatusModel):
    """One step of a restore."""

    name: RestoreStepName = Field(description="Preflight, ScaleDown, Restore, Check or ScaleUp.")
    phase: StepPhase = Field(description="Running, Succeeded or Failed.")
    start_time: str | None = Field(None, description="When the step started.")
    end_time: str | None = Field(None, description="When the step ended.")
    message: str | None = Field(None, description="What happened.")


class ReplicaRecord(StatusModel):
    """A workload's replica count recorded before it was changed."""

    kind: str = Field(description="Deployment or StatefulSet.")
    name: str = Field(description="Workload name.")
    replicas: int = Field(description="Replicas before the change.")


class RestoreChecks(StatusModel):
    """What preflight and the post-restore checks found."""

    sha256: str | None = Field(None, description="SHA-256 of the encrypted object, as computed while streaming.")
    size_bytes: int | None = Field(None, description="Size of the encrypted object.")
    archive_entries: int | None = Field(None, description="Entries pg_restore --list read from the archive.")
    tables: int | None = Field(None, description="Tables in the restored database that the manifest recorded.")
    rows: int | None = Field(None, description="Rows counted in those tables after the restore.")
    table_row_counts: dict[str, int] = Field(
        default_factory=dict, description="Rows per table after the restore (all equal to the manifest's)."
    )
    sequences: int | None = Field(None, description="Sequences whose value matched the manifest's.")
    large_objects: int | None = Field(
        None, description="Large objects after the restore (count and content digest as the manifest recorded)."
    )
    rdb_version: int | None = Field(None, description="Redis: the RDB format version of the backup.")
    keyspace: dict[str, int] = Field(
        default_factory=dict, description="Redis: keys per db after the restore (db0: n), as the manifest recorded."
    )
    keys: int | None = Field(None, description="Redis: keys after the restore, in all dbs.")
    expired_since_backup: int | None = Field(
        None, description="Redis: keys of the backup whose TTL ran out before the restore (not restored)."
    )
    sampled_keys: int | None = Field(
        None, description="Redis: keys compared value by value (and TTL) between the backup and the target."
    )


class PinnedBackup(StatusModel):
    """The backup the preflight verified: the restore Job and the checks use exactly this, never a re-read."""

    folder: str = Field(description="The backup's folder, where the manifest was read.")
    manifest: str = Field(description="The manifest as the preflight read it (JSON), signature included.")
    etag: str | None = Field(
        None, description="The data object's ETag as the preflight read it: the Job reads only that object."
    )


class KubernetesRestoreSummary(StatusModel):
    """What re-applying a Kubernetes export did, or would do in a dry run (object names only, never data)."""

    section: str | None = Field(None, description="The exported namespace whose section was applied.")
    namespace: str | None = Field(None, description="The namespace it was applied into.")
    dry_run: bool | None = Field(None, description="The API server's dry run only: nothing was changed.")
    conflicts: str | None = Field(None, description="The conflicts policy: Skip or Replace.")
    objects: int | None = Field(None, description="Objects in the section that were considered.")
    counts: dict[str, int] = Field(
        default_factory=dict, description="Objects per outcome: created, replaced, skipped, unchanged, failed."
    )
    created: list[str] = Field(default_factory=list, description="Kind/name of objects created (or to be).")
    replaced: list[str] = Field(
        default_factory=list, description="Objects that existed and differed, replaced (or to be) by the backup's."
    )
    skipped: list[str] = Field(
        default_factory=list, description="Objects that exist and differ, left alone (conflicts: Skip)."
    )
    unchanged: list[str] = Field(default_factory=list, description="Objects already as in the backup.")
    failed: list[str] = Field(default_factory=list, description="Objects the API server refused, with the reason.")
    secrets_left_out: int | None = Field(None, description="Secrets in the section not applied (no includeSecrets).")
    truncated: bool | None = Field(None, description="The name lists were shortened; counts are complete.")


class PointInTimeStatus(StatusModel):
    """What a point-in-time restore chose and reached."""

    target: str | None = Field(None, description="The requested point: a time, an LSN or latest.")
    base_backup: str | None = Field(None, description="Folder of the base backup restored.")
    base_backup_stop_lsn: str | None = Field(None, description="Where that base backup became consistent.")
    segments: int | None = Field(None, description="WAL segments fetched and verified.")
    first_segment: str | None = Field(None, description="The first WAL segment replayed.")
    last_segment: str | None = Field(None, description="The last WAL segment replayed.")
    volume_claim: str | None = Field(None, description="The claim that holds the recovered data directory.")
    previous_data_directory: str | None = Field(
        None, description="InPlace: where the replaced data directory was kept, inside the same volume."
    )
    recovered_time: str | None = Field(
        None, description="The newest commit the recovered server replayed (RFC 3339), when it reported one."
    )


class BackupRestoreStatus(StatusBase):
    """Observed state of a BackupRestore."""

    phase: RestorePhase | None = Field(None, description="The step running, or how the restore ended.")
    backup_key: str | None = Field(None, description="The data object being restored.")
    backup_time: str | None = Field(None, description="When that backup finished (RFC 3339).")
    target: str | None = Field(None, description="host:port/database restored into.")
    start_time: str | None = Field(None, description="When the restore started.")
    completion_time: str | None = Field(None, description="When it ended (Succeeded, Failed or DryRun).")
    steps: list[RestoreStep] = Field(default_factory=list, description="The restore's timeline.")
    scaled_down: list[ReplicaRecord] | None = Field(
        None, description="Replica counts recorded before scaling down (written before any change)."
    )
    job_name: str | None = Field(None, description="The restore Job.")
    checks: RestoreChecks | None = Field(None, description="What was verified, with figures.")
    pinned: PinnedBackup | None = Field(None, description="The backup the preflight verified, pinned for the Job.")
    kubernetes: KubernetesRestoreSummary | None = Field(
        None, description="A Kubernetes export's restore: what was (or would be) created, replaced or left alone."
    )
    point_in_time: PointInTimeStatus | None = Field(
        None, description="A point-in-time restore: the base backup, the WAL replayed and the point reached."
    )
