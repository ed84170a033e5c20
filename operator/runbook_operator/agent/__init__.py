"""What runs inside the CronJob/Job pods, and the contract between those pods and the operator.

The pod gets everything through its spec: the policy's spec as JSON in ``RUNBOOK_BACKUP_SPEC`` (it holds
only references, never a secret), the credentials as environment variables filled from ``secretKeyRef``
(libpq's, redis-cli's and the AWS SDK's own variable names, so the tools read them directly and no secret
appears on a command line), the GPG public keys from a ``configMapKeyRef``, and its Job's name through the
downward API. A test runs the same agent as a plain process with the same variables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..clients.s3 import list_keys, object_key
from ..models.sources import S3Location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SPEC_ENV = "RUNBOOK_BACKUP_SPEC"
JOB_NAME_ENV = "RUNBOOK_JOB_NAME"
PG_USER_ENV = "PGUSER"
PG_PASSWORD_ENV = "PGPASSWORD"
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


@dataclass(frozen=True)
class StoredBackup:
    """One timestamped folder of a policy; complete when its manifest exists."""

    folder: str
    time: datetime
    complete: bool


def stored_backups(client: S3Client, location: S3Location, namespace: str, policy: str) -> list[StoredBackup]:
    """The policy's backups, oldest first."""
    base = policy_folder(location, namespace, policy)
    found: dict[str, bool] = {}
    for key in list_keys(client, location, base):
        folder, _, leaf = key[len(base) :].partition("/")
        if parse_timestamp(folder) is not None:
            found[folder] = found.get(folder, False) or leaf == MANIFEST
    return [
        StoredBackup(f"{base}{folder}/", parse_timestamp(folder) or datetime.min.replace(tzinfo=UTC), complete)
        for folder, complete in sorted(found.items())
    ]
