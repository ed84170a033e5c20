"""What runs inside the CronJob/Job pods, and the contract between those pods and the operator.

The pod gets everything through its spec: the policy's spec as JSON in ``RUNBOOK_BACKUP_SPEC`` (it holds
only references, never a secret), the credentials as environment variables filled from ``secretKeyRef``
(libpq's, redis-cli's and the AWS SDK's own variable names, so the tools read them directly and no secret
appears on a command line), the GPG public keys from a ``configMapKeyRef``, and its Job's name through the
downward API. A test runs the same agent as a plain process with the same variables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..clients.s3 import list_keys
from ..models.plans import MANIFEST, parse_timestamp, policy_folder
from ..models.sources import S3Location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


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
