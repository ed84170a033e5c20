"""SecretRotation: the runbook's "Secret Rotation" procedure."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from .common import (
    SECRET_KEY,
    CamelModel,
    CredentialsSecretRef,
    Cron,
    Duration,
    ObjectName,
    Port,
    StatusBase,
    StatusModel,
    TimeZone,
    WorkloadRef,
    cel,
)
from .sources import SCRAM_ONLY, PostgresTLS, RedisTLS

# PostgreSQL names are at most 63 bytes; the dual login roles append "_a" / "_b" to the group role.
DUAL_GROUP_MAX_LENGTH = 61


class RotatedSecretRef(CamelModel):
    """The Secret key whose value is rotated; other keys of the Secret are never touched."""

    name: ObjectName = Field(description="Name of the Secret.")
    key: str = Field(description="Key holding the password.", min_length=1, max_length=253, pattern=SECRET_KEY)
    username_key: str | None = Field(
        None, description="Key holding the user name (written in dual strategy).", min_length=1, pattern=SECRET_KEY
    )


class Generator(CamelModel):
    """How new values are generated (by a CSPRNG)."""

    length: int = Field(32, description="Number of characters.", ge=16, le=256)
    alphabet: Literal["alphanumeric", "base64url", "hex"] = Field(
        "alphanumeric", description="Character set: alphanumeric (safe in URLs and shells), base64url or hex."
    )


class PostgresRotationTarget(CamelModel):
    """A PostgreSQL role whose password is changed with ALTER ROLE."""

    host: str = Field(description="Server host.", min_length=1)
    port: Port = Field(5432, description="Server port.")
    database: str = Field("postgres", description="Database to connect to.", min_length=1)
    user: str = Field(
        description="Role to rotate (single) or the NOLOGIN group role (dual).", min_length=1, max_length=63
    )
    admin_secret_ref: CredentialsSecretRef = Field(description="Secret with a login allowed to ALTER ROLE.")
    tls: PostgresTLS | None = Field(
        None,
        description="Verified TLS: the server must present a certificate for host signed by this CA "
        "(sslmode=verify-full). Required unless insecurePlaintext is true. " + SCRAM_ONLY,
    )
    insecure_plaintext: bool = Field(
        False,
        description="Connect without verified TLS (the admin login then goes to a server that is not "
        "authenticated): an explicit opt-out, shown as a Warning condition. Ignored when tls is set. " + SCRAM_ONLY,
    )


class RedisRotationTarget(CamelModel):
    """A Redis ACL user whose password is changed with ACL SETUSER."""

    host: str = Field(description="Server host.", min_length=1)
    port: Port = Field(6379, description="Server port.")
    tls: RedisTLS | None = Field(None, description="TLS settings.")
    user: str = Field("default", description="ACL user to rotate.", min_length=1)
    admin_secret_ref: CredentialsSecretRef = Field(description="Secret with an ACL admin login.")
    insecure_plaintext: bool = Field(
        False,
        description="Send the admin login (AUTH) over plain TCP, without TLS: an explicit opt-out, shown as a "
        "Warning condition. Without it, the target needs tls. Ignored when tls is enabled.",
    )


class RotationTarget(CamelModel):
    """Where the password is used: at most one of postgresql and redis."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!(has(self.postgresql) && has(self.redis))", "set at most one of postgresql and redis"),
        )
    )

    postgresql: PostgresRotationTarget | None = Field(None, description="A PostgreSQL role.")
    redis: RedisRotationTarget | None = Field(None, description="A Redis ACL user.")

    @model_validator(mode="after")
    def _at_most_one(self) -> RotationTarget:
        if self.postgresql is not None and self.redis is not None:
            raise ValueError("set at most one of postgresql and redis")
        return self


class SecretRotationSpec(CamelModel):
    """A password that is rotated on a schedule, applied where it is used, and rolled out."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!(has(self.schedule) && has(self.interval))", "set at most one of schedule and interval"),
            (
                "self.strategy != 'dual' || (has(self.target) && has(self.target.postgresql))",
                "strategy dual needs target.postgresql",
            ),
            (
                "self.strategy != 'dual' || has(self.secretRef.usernameKey)",
                "strategy dual needs secretRef.usernameKey (the Secret names the active login role)",
            ),
            (
                "self.strategy != 'dual' || !has(self.target) || !has(self.target.postgresql) "
                "|| size(self.target.postgresql.user) <= 61",
                "strategy dual: target.postgresql.user must be at most 61 characters",
            ),
        )
    )

    secret_ref: RotatedSecretRef = Field(description="The Secret key to rotate.")
    schedule: Cron | None = Field(None, description="When to rotate (cron).")
    time_zone: TimeZone = Field("UTC", description="Time zone of the schedule.")
    interval: Duration | None = Field(None, description="Rotate this long after the last rotation, e.g. 30d.")
    generator: Generator = Field(default_factory=Generator, description="How new passwords are generated.")
    target: RotationTarget | None = Field(None, description="Where the password is used; Secret-only when absent.")
    restart_targets: list[WorkloadRef] = Field(
        default_factory=list, description="Workloads restarted after the Secret changes."
    )
    strategy: Literal["single", "dual"] = Field(
        "single", description="single: change one role's password. dual: alternate two login roles (PostgreSQL)."
    )
    rotate_now: str | None = Field(None, description="Change this token to force one rotation now.")
    rollout_timeout: Duration = Field(
        "10m", description="How long to wait for the restarted workloads to roll out (they roll in parallel)."
    )

    @model_validator(mode="after")
    def _checks(self) -> SecretRotationSpec:
        if self.schedule is not None and self.interval is not None:
            raise ValueError("set at most one of schedule and interval")
        if self.strategy == "dual" and (self.target is None or self.target.postgresql is None):
            raise ValueError("strategy dual needs target.postgresql")
        if self.strategy == "dual" and self.secret_ref.username_key is None:
            raise ValueError("strategy dual needs secretRef.usernameKey (the Secret names the active login role)")
        group = self.target.postgresql.user if self.target and self.target.postgresql else ""
        if self.strategy == "dual" and len(group) > DUAL_GROUP_MAX_LENGTH:
            raise ValueError(
                f"strategy dual: target.postgresql.user must be at most {DUAL_GROUP_MAX_LENGTH} characters "
                "(the login roles are <user>_a and <user>_b)"
            )
        return self


class RolloutRecord(StatusModel):
    """How a restarted workload's rollout went."""

    kind: str = Field(description="Deployment or StatefulSet.")
    name: str = Field(description="Workload name.")
    ready: bool = Field(description="The rollout completed.")
    message: str | None = Field(None, description="Why not, when it did not.")


class RotationStep(enum.StrEnum):
    """The steps of one rotation, in order; ``status.step`` names the last one completed."""

    STARTED = "Started"  # rotationId recorded, before any side effect
    GENERATED = "Generated"  # the new value is in the pending Secret
    APPLIED = "Applied"  # the target accepts it (the old one still works where the target allows)
    VERIFIED = "Verified"  # a login with it works
    PUBLISHED = "Published"  # the rotated Secret holds it
    RESTARTED = "Restarted"  # the restart targets rolled out (or rolloutTimeout passed: Degraded)
    DONE = "Done"  # the old Redis password and the pending Secret are gone


class RotationPhase(enum.StrEnum):
    """A SecretRotation's one-word state."""

    READY = "Ready"
    ROTATING = "Rotating"
    DEGRADED = "Degraded"
    PAUSED = "Paused"
    FAILED = "Failed"


class SecretRotationStatus(StatusBase):
    """Observed state of a SecretRotation. Holds fingerprints only, never values."""

    phase: RotationPhase | None = Field(None, description="A one-word summary of the state.")
    target_kind: str | None = Field(None, description="postgresql, redis or secret-only.")
    rotation_id: str | None = Field(None, description="The rotation in flight (or last finished).")
    step: RotationStep | None = Field(None, description="The last step the rotation in flight completed.")
    step_time: str | None = Field(
        None,
        description="When that step was completed (after Published: when the wait for the rollouts began, "
        "which rolloutTimeout counts from).",
    )
    last_rotation_time: str | None = Field(None, description="When the last rotation finished.")
    next_rotation_time: str | None = Field(None, description="When the next rotation is due.")
    fingerprint: str | None = Field(None, description="Short hash of the current value.")
    active_role: str | None = Field(None, description="The login role the Secret names (dual).")
    rotate_now: str | None = Field(None, description="The last rotateNow token acted on.")
    targets: list[RolloutRecord] = Field(default_factory=list, description="Rollouts of the last rotation.")
