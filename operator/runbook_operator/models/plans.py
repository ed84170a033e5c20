"""The contract between the operator and the pods it starts (backup CronJobs, restore and drill Jobs).

A pod gets everything through its spec: the policy's spec as JSON in ``RUNBOOK_BACKUP_SPEC`` or a restore's
plan in ``RUNBOOK_RESTORE_PLAN`` (references only, never a secret), the credentials as environment variables
filled from ``secretKeyRef`` (libpq's, redis-cli's and the AWS SDK's own variable names, so the tools read
them directly and no secret appears on a command line), the GPG public keys from a ``configMapKeyRef``, and
its Job's name through the downward API. Pure data: builders and the agent both import it, neither does I/O
through it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field

from .backup import RestoreRoles
from .common import CamelModel
from .sources import PostgresConnection, RedisConnection, S3Location

SPEC_ENV = "RUNBOOK_BACKUP_SPEC"
JOB_NAME_ENV = "RUNBOOK_JOB_NAME"
PG_USER_ENV = "PGUSER"
PG_PASSWORD_ENV = "PGPASSWORD"
PG_CA_FILE_ENV = "PGSSLROOTCERT"  # the CA file of PostgresTLS.caSecretRef in an agent pod (libpq reads it too)
REDIS_PASSWORD_ENV = "REDISCLI_AUTH"
REDIS_CA_FILE_ENV = "RUNBOOK_REDIS_CA_FILE"
# The client certificate and key for mutual TLS: paths of files on a Secret volume (the key never in env).
REDIS_CERT_FILE_ENV = "RUNBOOK_REDIS_CERT_FILE"
REDIS_KEY_FILE_ENV = "RUNBOOK_REDIS_KEY_FILE"
S3_ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
S3_SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
GPG_RECIPIENTS_ENV = "RUNBOOK_GPG_RECIPIENTS"
GPG_PASSPHRASE_ENV = "RUNBOOK_GPG_PASSPHRASE"
# Restores: the plan (what to restore where, references only) and the private key for public-key backups.
RESTORE_PLAN_ENV = "RUNBOOK_RESTORE_PLAN"
GPG_PRIVATE_KEY_ENV = "RUNBOOK_GPG_PRIVATE_KEY"
# The namespace's manifest signing key (HMAC-SHA256): backup pods sign each manifest with it, restore and
# verify runs refuse a manifest whose signature does not verify. From the Secret below, by secretKeyRef.
MANIFEST_KEY_ENV = "RUNBOOK_MANIFEST_KEY"
MANIFEST_KEY_SECRET = "runbook-manifest-key"
MANIFEST_KEY_SECRET_KEY = "key"
SIGNATURE = "signature"

# Bucket layout: <prefix>/<namespace>/<policy>/<UTC timestamp>/{<source>.<ext>.gpg, manifest.json}.
MANIFEST = "manifest.json"
DATA_OBJECTS = {"postgresql": "postgresql.dump.gpg", "redis": "redis.rdb.gpg", "kubernetes": "kubernetes.yaml.gpg"}
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_TIMESTAMP = re.compile(r"^\d{8}T\d{6}Z$")


def format_timestamp(moment: datetime) -> str:
    """A backup's folder name: UTC, second precision, sorts by time."""
    return moment.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(name: str) -> datetime | None:
    """The time of a backup folder name, or None when the name is not one."""
    if not _TIMESTAMP.match(name):
        return None
    return datetime.strptime(name, TIMESTAMP_FORMAT).replace(tzinfo=UTC)


def policy_folder(location: S3Location, namespace: str, policy: str) -> str:
    """Where a policy's backups are: ``<prefix>/<namespace>/<policy>/``."""
    return object_key(location, namespace, policy) + "/"


def backup_folder(base: str, backup: str) -> str | None:
    """The folder under ``base`` (a policy's folder) that ``backup`` names by its timestamp, its folder or one
    of its keys, or None when it names none."""
    relative = backup.removeprefix(base).strip("/").split("/")[0]
    if parse_timestamp(relative) is None:
        return None
    return f"{base}{relative}/"


def object_key(location: S3Location, *parts: str) -> str:
    """Join the location's prefix and the parts with slashes."""
    return "/".join(p for p in (location.prefix, *parts) if p)


# --- manifest signatures ---------------------------------------------------------------------------------


def canonical_manifest(manifest: Mapping[str, Any]) -> bytes:
    """What a signature covers: the manifest without its ``signature``, as JSON with sorted keys and no
    whitespace (ASCII only, so the bytes do not depend on how the document travelled)."""
    unsigned = {name: value for name, value in manifest.items() if name != SIGNATURE}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sign_manifest(manifest: Mapping[str, Any], key: str) -> str:
    """The manifest's signature: HMAC-SHA256 of its canonical JSON under ``key``, hex."""
    return hmac.new(key.encode(), canonical_manifest(manifest), hashlib.sha256).hexdigest()


def manifest_signed(manifest: Mapping[str, Any], key: str) -> bool:
    """Whether the manifest carries a signature made with ``key`` over exactly its other fields."""
    signature = manifest.get(SIGNATURE)
    if not isinstance(signature, str):
        return False
    try:
        expected = sign_manifest(manifest, key)
    except (TypeError, ValueError):
        return False  # not JSON-serialisable as written: not a manifest any backup signed
    return hmac.compare_digest(signature.encode(), expected.encode())


# --- restore plans: what one restore or drill Job reads and where it writes -----------------------------
SCRATCH_DIR_ENV = "RUNBOOK_SCRATCH_DIR"
_MANIFEST_DESCRIPTION = "The backup's manifest as stored, signature included (checked when the run has the key)."
_ETAG_DESCRIPTION = "The object's ETag as the preflight read it: later reads get that object only (If-Match)."


class RoleRecord(CamelModel):
    """A role the backed-up database refers to, as the backup agent recorded it (never a password)."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="Role name.", min_length=1, max_length=63)
    login: bool = Field(False, description="LOGIN.")
    inherit: bool = Field(True, description="INHERIT.")
    connection_limit: int = Field(-1, description="CONNECTION LIMIT.", ge=-1)
    privileged: list[str] = Field(default_factory=list, description="Attributes recorded and never re-created.")
    member_of: list[str] = Field(default_factory=list, description="Recorded roles this one is a member of.")


class StoredObjectPlan(CamelModel):
    """The stored object every restore plan reads: where it is, what the preflight pinned, how it is encrypted."""

    location: S3Location = Field(description="The policy's bucket.")
    key: str = Field(description="Key of the encrypted data object.")
    sha256: str = Field(description="SHA-256 of the object, from the manifest.")
    size_bytes: int = Field(description="Size of the object, from the manifest.")
    symmetric: bool = Field(description="Encrypted with a passphrase (else to public keys).")
    manifest: dict[str, Any] | None = Field(None, description=_MANIFEST_DESCRIPTION)
    etag: str | None = Field(None, description=_ETAG_DESCRIPTION)


class RestorePlan(StoredObjectPlan):
    """What one restore or verify run reads and where it writes (references only, never a secret)."""

    tables: list[str] = Field(default_factory=list, description="Tables the manifest recorded (schema.table).")
    table_oids: dict[str, int] = Field(
        default_factory=dict, description="Each table's OID in the source (older manifests have none)."
    )
    target: PostgresConnection = Field(description="The database to restore into.")
    roles: RestoreRoles = Field(default_factory=RestoreRoles, description="The restore's spec.roles.")
    backup_roles: list[RoleRecord] = Field(
        default_factory=list, description="The roles the manifest recorded (created when missing, if asked)."
    )


class RedisRestorePlan(StoredObjectPlan):
    """What one Redis restore reads and where it writes (references only, never a secret)."""

    kind: Literal["redis"] = Field("redis", description="The source kind of the backup.")
    keyspace: dict[str, int] = Field(default_factory=dict, description="Keys per db at backup time (db0: n).")
    target: RedisConnection = Field(description="The Redis restored into.")
    sample_every: int = Field(50, description="One key in this many is compared value by value.", ge=1)


class KubernetesRestorePlan(StoredObjectPlan):
    """What one Kubernetes restore reads and where it applies (references only, never a secret)."""

    section: str = Field(description="The exported namespace whose section is applied.")
    namespace: str = Field(description="The namespace applied into.")
    include_secrets: bool = Field(False, description="Apply the section's Secrets too.")
    conflicts: Literal["Skip", "Replace"] = Field("Skip", description="Objects that exist and differ.")
    dry_run: bool = Field(False, description="The API server's dry run only.")


# --- continuous WAL archiving (BackupPolicy spec.wal) and point-in-time restores ------------------------
# Bucket layout under the policy's folder (policy_folder):
#   wal/<timeline:08X>/<segment>.gpg + <segment>.json     a complete segment (24 hex digits, PostgreSQL's name)
#   wal/<timeline:08X>/<segment>.partial.gpg + .json      the segment being written, re-shipped every
#                                                          shipIntervalSeconds (replaced by the complete one)
#   wal/<timeline:08X>.history.gpg + .json                a timeline history file
#   base/<UTC timestamp>/base.tar.gpg + manifest.json     a base backup (pg_basebackup -Ft -D - -X none)
# Every .json is a manifest signed like a dump's (sign_manifest): the WAL ones are WALSegmentManifest,
# the base backups' BaseBackupManifest. Plaintext WAL never reaches a persistent disk: the receiver's scratch
# is a memory-backed emptyDir (WAL_SCRATCH_ENV).
WAL_FOLDER = "wal"
BASE_FOLDER = "base"
BASE_OBJECT = "base.tar.gpg"
WAL_SPEC_ENV = "RUNBOOK_WAL_SPEC"  # the policy's spec (JSON) for the receiver and the base-backup runs
WAL_SCRATCH_ENV = "RUNBOOK_WAL_SCRATCH"  # the receiver's memory-backed directory
PITR_PLAN_ENV = "RUNBOOK_PITR_PLAN"  # a point-in-time restore Job's PointInTimePlan (JSON)
PGDATA_ROOT_ENV = "RUNBOOK_PGDATA_ROOT"  # where the restore Job mounts the volume that holds the data directory
_SEGMENT_PATTERN = r"^[0-9A-F]{24}$"
_SEGMENT = re.compile(_SEGMENT_PATTERN)


def slot_name(namespace: str, policy: str) -> str:
    """The default replication slot of a policy: ``runbook_<namespace>_<policy>`` in slot characters, shortened
    with a hash to PostgreSQL's 63 characters."""
    raw = f"runbook_{namespace}_{policy}".replace("-", "_").replace(".", "_").lower()
    if len(raw) <= 63:
        return raw
    return raw[:54] + "_" + hashlib.sha256(raw.encode()).hexdigest()[:8]


def parse_lsn(text: str) -> int:
    """``0/3000148`` -> its 64-bit position."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(position: int) -> str:
    """A 64-bit position -> ``0/3000148`` (PostgreSQL's spelling)."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


WAL_SEGMENT_BYTES = 16 * 1024 * 1024  # PostgreSQL's default (initdb --wal-segsize); manifests record theirs


def segment_name(timeline: int, position: int, segment_bytes: int = WAL_SEGMENT_BYTES) -> str:
    """The WAL file holding ``position`` on ``timeline`` (PostgreSQL's 24-hex-digit name)."""
    number = position // segment_bytes
    per_id = 0x100000000 // segment_bytes
    return f"{timeline:08X}{number // per_id:08X}{number % per_id:08X}"


def segment_start(name: str, segment_bytes: int = WAL_SEGMENT_BYTES) -> int:
    """The first position of a segment named ``name``."""
    if not _SEGMENT.match(name):
        raise ValueError(f"not a WAL segment name: {name!r}")
    per_id = 0x100000000 // segment_bytes
    return (int(name[8:16], 16) * per_id + int(name[16:24], 16)) * segment_bytes


class WALSegmentManifest(CamelModel):
    """One shipped WAL file: a complete segment, the partial one, or a timeline history file."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="PostgreSQL's file name (24 hex digits, or <timeline>.history).")
    timeline: int = Field(description="The timeline.", ge=1)
    partial: bool = Field(False, description="The segment being written: valid through endLSN only.")
    start_lsn: str = Field(description="First position the file covers.")
    end_lsn: str = Field(description="Position after the last byte received into it.")
    segment_bytes: int = Field(WAL_SEGMENT_BYTES, description="The server's WAL segment size.")
    sha256: str = Field(description="SHA-256 of the encrypted object.")
    plain_sha256: str = Field(description="SHA-256 of the WAL file itself (checked after decryption).")
    size_bytes: int = Field(description="Size of the encrypted object.")
    shipped_time: str = Field(
        description="When the file was shipped (RFC 3339): everything through endLSN was committed before it."
    )
    symmetric: bool = Field(description="Encrypted with a passphrase (else to public keys).")


class BaseBackupManifest(CamelModel):
    """One base backup: the tar pg_basebackup wrote, and the WAL range it needs to be consistent."""

    model_config = ConfigDict(extra="ignore")

    timeline: int = Field(description="The timeline at the start.", ge=1)
    start_lsn: str = Field(description="WAL start point (pg_basebackup's 'write-ahead log start point').")
    stop_lsn: str = Field(description="WAL end point: the data directory is consistent once replayed to here.")
    start_time: str = Field(description="When the backup started (RFC 3339).")
    stop_time: str = Field(description="When it ended (RFC 3339): the earliest point it can recover to.")
    server_version: int = Field(description="server_version_num of the source.")
    segment_bytes: int = Field(WAL_SEGMENT_BYTES, description="The server's WAL segment size.")
    sha256: str = Field(description="SHA-256 of the encrypted tar.")
    size_bytes: int = Field(description="Size of the encrypted tar.")
    symmetric: bool = Field(description="Encrypted with a passphrase (else to public keys).")


class WALRange(CamelModel):
    """The WAL one point-in-time restore replays, as a range: the Job lists it in the bucket and reads, and
    verifies, each file's signed manifest itself (``wal_catalog.read_range``), so the plan's size does not grow
    with the chain."""

    namespace: str = Field(description="The policy's namespace (every manifest names it).")
    policy: str = Field(description="The BackupPolicy whose archive this is (every manifest names it).")
    first_segment: str = Field(description="The base backup's start segment (24 hex digits).", pattern=_SEGMENT_PATTERN)
    last_segment: str = Field(
        description="The last segment the target needs (24 hex digits).", pattern=_SEGMENT_PATTERN
    )
    segment_bytes: int = Field(WAL_SEGMENT_BYTES, description="The server's WAL segment size.", gt=0)
    timelines: list[int] = Field(description="The timelines whose segments the range reads.", min_length=1)
    histories: list[int] = Field(default_factory=list, description="The timelines whose history file is replayed.")
    segments: int = Field(description="How many segments the preflight found in the range.", ge=1)


class PointInTimePlan(CamelModel):
    """What one point-in-time restore Job fetches and how it recovers (references only, never a secret)."""

    location: S3Location = Field(description="The policy's bucket.")
    base_key: str = Field(description="Key of the base backup's encrypted tar.")
    base_manifest: dict[str, Any] = Field(description="The base backup's manifest as stored, signature included.")
    wal: WALRange = Field(description="The WAL to replay after the base backup.")
    data_directory: str = Field(description="The data directory's path inside the mounted volume.")
    keep_previous_as: str | None = Field(
        None, description="InPlace: rename an existing data directory to this (inside the volume) first."
    )
    target_time: str | None = Field(None, description="recovery_target_time, or none.")
    target_lsn: str | None = Field(None, description="recovery_target_lsn, or none (latest when both are none).")
    timeline: int = Field(description="The timeline to recover along.", ge=1)
