"""The bucket catalog: where a policy's backups are, which are complete, their manifests, retention.

Backup (status, retention, deletion), restore (preflight) and the kubectl plugin read the bucket through
these functions only. Layout: ``<prefix>/<namespace>/<policy>/<UTC timestamp>/{<data object>, manifest.json}``
(``models/plans.py``).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import botocore.exceptions

from ..clients import kube, s3
from ..clients.s3 import delete_keys, get_json, list_keys
from ..errors import RunbookError
from ..models.backup import Retention
from ..models.common import parse_duration
from ..models.plans import MANIFEST, format_timestamp, parse_timestamp, policy_folder
from ..models.sources import S3Location
from ..settings import connection_pool_size

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

S3_CREDENTIALS_FIELD = "spec.destination.s3.credentialsSecretRef"
_CLOCK_SKEW = timedelta(minutes=10)  # a run's folder is named by the pod's clock, not the API server's


def s3_client(api: kube.Api, namespace: str, location: S3Location, *, field: str) -> S3Client:
    """The operator's shared client (``s3.shared_client``: one per endpoint, region and keys, bounded by
    ``s3.OPERATOR_TIMEOUTS``) with the keys of the location's Secret (``field`` names it in errors), or ambient
    ones."""
    ref = location.credentials_secret_ref
    key_id = secret = None
    if ref is not None:
        once = cast(kube.Api, _ReadOnce(api))  # one GET of the Secret for both keys
        key_id = kube.secret_value(once, namespace, ref.name, ref.access_key_id_key, field=field)
        secret = kube.secret_value(once, namespace, ref.name, ref.secret_access_key_key, field=field)
    # One client made at a time per endpoint, region and keys: the first passes of a burst (20 at once) wait for
    # it instead of each making a client (0.1 s of CPU each) that all but one throw away.
    with _making.setdefault(
        (location.endpoint, location.region, s3.credentials_digest(key_id, secret)), threading.Lock()
    ):
        return s3.shared_client(location, key_id, secret, pool_size=connection_pool_size())


_making: dict[tuple[str | None, str | None, str], threading.Lock] = {}  # dict.setdefault is atomic


class _ReadOnce:
    """``api``'s GET, each object read once (``s3_client``'s two keys of one Secret)."""

    def __init__(self, api: kube.Api) -> None:
        self._api = api
        self._read: dict[tuple[str, str, str], dict[str, Any] | None] = {}

    def get(self, resource: kube.Resource, namespace: str, name: str) -> dict[str, Any] | None:
        key = (resource.plural, namespace, name)
        if key not in self._read:
            self._read[key] = self._api.get(resource, namespace, name)
        return self._read[key]


def s3_error(error: Exception, location: S3Location) -> RunbookError:
    """The RunbookError of a failed S3 call on the location (naming the field), which also makes the next
    ``check_bucket`` of that bucket check it again."""
    forget_bucket(location)
    if isinstance(error, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError):
        limits = s3.OPERATOR_TIMEOUTS
        connecting = isinstance(error, botocore.exceptions.ConnectTimeoutError)
        what, seconds = ("connection", limits.connect) if connecting else ("answer", limits.read)
        return RunbookError(
            "S3Timeout",
            f"spec.destination.s3.endpoint: no {what} from {location.endpoint or 'AWS S3'} within {seconds:g} s "
            f"({limits.attempts} attempts)",
            retry_after=60,
        )
    if isinstance(error, botocore.exceptions.ClientError):
        code = str(error.response.get("Error", {}).get("Code", "Error"))
        if code in ("404", "NoSuchBucket"):
            return RunbookError(
                "BucketNotFound", f"spec.destination.s3.bucket: bucket {location.bucket} does not exist", retry_after=60
            )
        if code in ("403", "AccessDenied"):
            return RunbookError(
                "BucketForbidden", f"spec.destination.s3: access to bucket {location.bucket} denied", retry_after=60
            )
        return RunbookError("S3Error", f"spec.destination.s3: {code}", retry_after=60)
    return RunbookError("S3Unreachable", f"spec.destination.s3: {type(error).__name__}", retry_after=60)


# A bucket found (HEAD) with its lifecycle rule in place is not checked again for CHECK_TTL seconds by the same
# client (the client is the endpoint, region and keys), per bucket and prefix; any failed call on the bucket that
# goes through ``s3_error`` forgets it.
# A bucket deleted or a rule removed meanwhile is seen by the next check after the TTL (a backup Job that runs
# meanwhile fails on its own and says so).
CHECK_TTL = 600.0
_checked: weakref.WeakKeyDictionary[S3Client, dict[tuple[str, str], float]] = weakref.WeakKeyDictionary()
_checked_lock = threading.Lock()


def forget_bucket(location: S3Location) -> None:
    """The bucket is checked again by the next ``check_bucket`` (every prefix, every client)."""
    with _checked_lock:
        for checked in _checked.values():
            for where in [w for w in checked if w[0] == location.bucket]:
                del checked[where]


def check_bucket(client: S3Client, location: S3Location) -> None:
    """The bucket exists and is ours to write, with the lifecycle rule that aborts abandoned multipart
    uploads under the location's prefix (installed when missing: ``s3.ensure_abort_incomplete_uploads``,
    safe under concurrency). Remembered for CHECK_TTL seconds; a timeout is ``S3Timeout``."""
    where = (location.bucket, location.prefix)
    with _checked_lock:
        checked = _checked.setdefault(client, {})
        if checked.get(where, 0.0) > time.monotonic():
            return
    try:
        client.head_bucket(Bucket=location.bucket)
        s3.ensure_abort_incomplete_uploads(client, location)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise s3_error(error, location) from None  # forgets the bucket
    with _checked_lock:
        checked[where] = time.monotonic() + CHECK_TTL


def expired_backups(
    backups: Iterable[StoredBackup],
    *,
    now: datetime,
    max_age: timedelta | None,
    min_keep: int,
    verified: str | None = None,
) -> list[StoredBackup]:
    """Those older than ``max_age``, except the ``min_keep`` newest complete ones (whatever their age) and
    the newest verified one (a restore drill proved it restorable). Folders without a manifest (a run killed
    between upload and manifest) expire like backups."""
    if max_age is None:
        return []
    ordered = sorted(backups, key=lambda b: b.time, reverse=True)
    kept = {b.folder for b in [b for b in ordered if b.complete][:min_keep]} | {verified}
    return [b for b in reversed(ordered) if b.folder not in kept and b.time < now - max_age]


def delete_backups(client: S3Client, location: S3Location, folders: list[str]) -> None:
    """Manifests first: a half-deleted backup never looks complete."""
    keys = [key for folder in folders for key in list_keys(client, location, folder)]
    delete_keys(client, location, [k for k in keys if k.endswith(f"/{MANIFEST}")])
    delete_keys(client, location, [k for k in keys if not k.endswith(f"/{MANIFEST}")])


def prune(
    client: S3Client,
    location: S3Location,
    *,
    namespace: str,
    policy: str,
    retention: Retention,
    now: datetime,
    verified: str | None = None,
) -> list[str]:
    """Delete the expired backups (never ``verified``, the newest a drill restored); return their folders."""
    max_age = parse_duration(retention.max_age) if retention.max_age else None
    backups = stored_backups(client, location, namespace, policy)
    expired = expired_backups(backups, now=now, max_age=max_age, min_keep=retention.min_keep, verified=verified)
    delete_backups(client, location, [b.folder for b in expired])
    return [b.folder for b in expired]


def find_manifest(
    client: S3Client, location: S3Location, *, namespace: str, policy: str, job: str, created: datetime
) -> dict[str, Any] | None:
    """The manifest written by this Job's run (runs start after their Job was created)."""
    base = policy_folder(location, namespace, policy)
    for key in list_keys(client, location, base, start_after=base + format_timestamp(created - _CLOCK_SKEW)):
        if key.endswith(f"/{MANIFEST}"):
            manifest = get_json(client, location, key)
            if manifest.get("job") == job:
                return manifest
    return None


def verify_manifest(client: S3Client, location: S3Location, manifest: dict[str, Any]) -> str | None:
    """Why the manifest does not describe a complete backup of ours, or None when it does."""
    data = manifest.get("data") or {}
    key = str(data.get("key", ""))
    try:
        head = client.head_object(Bucket=location.bucket, Key=key)
    except botocore.exceptions.ClientError:
        return f"the data object {key} named by the manifest is missing"
    if head["ContentLength"] != data.get("sizeBytes"):
        return f"the data object {key} has {head['ContentLength']} bytes, the manifest says {data.get('sizeBytes')}"
    if not data.get("sha256"):
        return "the manifest has no SHA-256"
    return None


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
