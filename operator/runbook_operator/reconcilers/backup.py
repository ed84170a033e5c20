"""BackupPolicy: converge the CronJob (and an export's RBAC), and derive status from facts.

``reconcile`` checks what the pods will need (the referenced Secret keys, the recipients' public keys, the
bucket), installs the bucket's lifecycle rule for abandoned multipart uploads, applies the children and
starts a backup-now Job. ``observe`` reads the policy's Jobs: a Job that succeeded counts only when its
manifest is in the bucket and matches (then expired backups are pruned); a Job that failed is recorded with
the agent's one-line reason. Both are level-based: running them again changes nothing.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import botocore.exceptions
import kopf
from croniter import croniter
from kubernetes.client import ApiException

from .. import metrics
from ..builders.backup import (
    POLICY_LABEL,
    build_backup_now_job,
    build_cronjob,
    build_export_rbac,
    cronjob_name,
)
from ..builders.common import contains
from ..clients import kube
from ..clients.gpg import GPG
from ..clients.s3 import (
    ensure_abort_incomplete_uploads,
)
from ..conditions import get_condition
from ..errors import RunbookError
from ..models import GROUP, VERSION
from ..models.backup import BACKUP_NOW, BackupPolicySpec
from ..models.plans import policy_folder
from ..models.sources import TLS_CERT_KEY, TLS_KEY_KEY
from ..settings import FIELD_MANAGER
from .base import StatusPatch, parse_spec, report_failure, retry_or_stop
from .catalog import (
    S3_CREDENTIALS_FIELD,
    delete_backups,
    find_manifest,
    prune,
    s3_client,
    s3_error,
    stored_backups,
    verify_manifest,
)
from .jobs import failure_reason, job_outcome, job_pods

if TYPE_CHECKING:
    pass

LOG = logging.getLogger(__name__)
PLURAL = "backuppolicies"
APPLY = "application/apply-patch+yaml"
SCHEDULED_AT = "batch.kubernetes.io/cronjob-scheduled-timestamp"


# --- S3: credentials, bucket checks, the backups of a policy, retention ---------------------------------


# --- the policy's children ------------------------------------------------------------------------------

_Read = Callable[[str, str], Any]
_Patch = Callable[..., Any]


def _handles(kind: str) -> tuple[_Read, _Patch]:
    if kind == "CronJob":
        return kube.batch().read_namespaced_cron_job, kube.batch().patch_namespaced_cron_job
    if kind == "ServiceAccount":
        return kube.core().read_namespaced_service_account, kube.core().patch_namespaced_service_account
    if kind == "Role":
        return kube.rbac().read_namespaced_role, kube.rbac().patch_namespaced_role
    return kube.rbac().read_namespaced_role_binding, kube.rbac().patch_namespaced_role_binding


def apply_child(desired: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Server-side apply unless the live object already has every desired value; (live object, changed)."""
    read, patch = _handles(desired["kind"])
    name, namespace = desired["metadata"]["name"], desired["metadata"]["namespace"]
    try:
        current = kube.api_client().sanitize_for_serialization(read(name, namespace))
    except ApiException as error:
        if error.status != 404:
            raise
        current = None
    if current is not None and contains(current, desired):
        return current, False
    result = patch(name, namespace, desired, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY)
    return kube.api_client().sanitize_for_serialization(result), True


def remove_stale_rbac(namespace: str, policy: str, keep: Iterable[dict[str, Any]]) -> None:
    """Delete the export's Roles, RoleBindings and ServiceAccount that are no longer desired (all of them
    when ``keep`` is empty): those in other namespaces have no owner to garbage-collect them."""
    wanted = {(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in keep}
    selector = f"{POLICY_LABEL}={policy},{POLICY_LABEL}-namespace={namespace}"
    rbac, core = kube.rbac(), kube.core()
    listings: list[tuple[str, Any, Callable[[str, str], Any]]] = [
        ("Role", rbac.list_role_for_all_namespaces(label_selector=selector), rbac.delete_namespaced_role),
        (
            "RoleBinding",
            rbac.list_role_binding_for_all_namespaces(label_selector=selector),
            rbac.delete_namespaced_role_binding,
        ),
        (
            "ServiceAccount",
            core.list_namespaced_service_account(namespace, label_selector=f"{POLICY_LABEL}={policy}"),
            core.delete_namespaced_service_account,
        ),
    ]
    for kind, listing, delete in listings:
        for item in listing.items:
            if (kind, item.metadata.namespace, item.metadata.name) not in wanted:
                try:
                    delete(item.metadata.name, item.metadata.namespace)
                except ApiException as error:
                    if error.status != 404:
                        raise


# --- reconcile ------------------------------------------------------------------------------------------


def check_references(namespace: str, spec: BackupPolicySpec) -> None:
    """Every Secret key and the recipients' keys the pod will need exist and are usable."""
    secret_refs: list[tuple[str, str, str]] = []
    source = spec.source
    if source.postgresql is not None:
        ref = source.postgresql.credentials_secret_ref
        field = "spec.source.postgresql.credentialsSecretRef"
        secret_refs += [(ref.name, ref.username_key, field), (ref.name, ref.password_key, field)]
    if source.redis is not None:
        if source.redis.password_secret_ref is not None:
            pw = source.redis.password_secret_ref
            secret_refs.append((pw.name, pw.key, "spec.source.redis.passwordSecretRef"))
        if source.redis.tls is not None and source.redis.tls.ca_secret_ref is not None:
            ca = source.redis.tls.ca_secret_ref
            secret_refs.append((ca.name, ca.key, "spec.source.redis.tls.caSecretRef"))
        if source.redis.tls is not None and source.redis.tls.client_certificate_secret_ref is not None:
            pair = source.redis.tls.client_certificate_secret_ref.name
            field = "spec.source.redis.tls.clientCertificateSecretRef"
            secret_refs += [(pair, TLS_CERT_KEY, field), (pair, TLS_KEY_KEY, field)]
    gpg = spec.encryption.gpg
    if gpg.passphrase_secret_ref is not None:
        secret_refs.append(
            (gpg.passphrase_secret_ref.name, gpg.passphrase_secret_ref.key, "spec.encryption.gpg.passphraseSecretRef")
        )
    for secret, key, field in secret_refs:
        kube.read_secret_value(namespace, secret, key, field=field)
    if gpg.recipients_config_map_ref is not None:
        ref_cm = gpg.recipients_config_map_ref
        field = "spec.encryption.gpg.recipientsConfigMapRef"
        armored = kube.read_config_map_value(namespace, ref_cm.name, ref_cm.key, field=field)
        with GPG() as keyring:
            keyring.import_public_keys(armored, field=field)


def reconcile(body: kopf.Body, *, image: str, retry: int = 0) -> None:
    """Converge the children and the Ready condition, then status from the Jobs and a backup-now request;
    any failure becomes Ready=False and the kopf error that retries with backoff (``retry``: kopf's count
    of earlier attempts) or waits for a spec change."""
    metadata = body["metadata"]
    namespace, name = metadata["namespace"], metadata["name"]
    status = StatusPatch(body.get("status"), metadata.get("generation"))
    try:
        spec = parse_spec(BackupPolicySpec, body.get("spec"))
        status.set(sourceKind=spec.source.kind, cronJobName=cronjob_name(name))
        check_references(namespace, spec)
        location = spec.destination.s3
        client = s3_client(kube.KubeApi(), namespace, location, field=S3_CREDENTIALS_FIELD)
        try:
            client.head_bucket(Bucket=location.bucket)
            ensure_abort_incomplete_uploads(client, location)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            raise s3_error(error, location) from None
        rbac_objects = build_export_rbac(body, spec)
        for child in rbac_objects:
            apply_child(child)
        remove_stale_rbac(namespace, name, rbac_objects)
        _, changed = apply_child(build_cronjob(body, spec, image=image))
        if changed:
            kopf.info(body, reason="CronJobApplied", message=f"CronJob {cronjob_name(name)}: {spec.schedule}")
        where = f"s3://{location.bucket}/{policy_folder(location, namespace, name)}"
        if spec.suspend:
            status.condition("Ready", "True", "Suspended", f"scheduled backups are suspended; backups go to {where}")
        else:
            status.condition(
                "Ready", "True", "Scheduled", f"backs up on '{spec.schedule}' ({spec.time_zone}) to {where}"
            )
        status.set(phase="Suspended" if spec.suspend else "Scheduled")
        status.write(plural=PLURAL, namespace=namespace, name=name)
        series = (namespace, name, spec.source.kind)
        if spec.suspend:
            metrics.BACKUP_SCHEDULE_INTERVAL.remove(*series)  # a suspended policy is never overdue
        else:
            metrics.BACKUP_SCHEDULE_INTERVAL.labels(*series).set(schedule_interval(spec.schedule, spec.time_zone))
        observe(namespace, name)
        backup_now(body)
    except Exception as raised:
        failure = report_failure(body, status, raised, phase="Invalid" if _is_invalid(raised) else "Blocked")
        status.write(plural=PLURAL, namespace=namespace, name=name)
        raise retry_or_stop(failure, retry=retry) from None


def schedule_interval(schedule: str, time_zone: str, *, runs: int = 64) -> float:
    """The longest gap in seconds between consecutive runs of ``schedule`` over its next ``runs`` runs, in
    its time zone (a weekday-only schedule's weekend, a month's 31 days, a DST night's extra hour count)."""
    starts = croniter(schedule, datetime.now(ZoneInfo(time_zone)))
    times = [starts.get_next(datetime) for _ in range(runs + 1)]
    return max((b - a).total_seconds() for a, b in itertools.pairwise(times))


def _is_invalid(error: Exception) -> bool:
    return isinstance(error, RunbookError) and error.reason == "InvalidSpec"


def backup_now(body: kopf.Body) -> None:
    """A new value of the backup-now annotation starts one Job from the CronJob's template. (kopf ignores
    annotations under its own prefix, so this runs on every event rather than as a change handler.)"""
    metadata = body["metadata"]
    token = (metadata.get("annotations") or {}).get(BACKUP_NOW)
    if not token or token == (body.get("status") or {}).get("backupNow"):
        return
    namespace, name = metadata["namespace"], metadata["name"]
    try:
        cronjob = kube.batch().read_namespaced_cron_job(cronjob_name(name), namespace)
    except ApiException as error:
        if error.status == 404:
            return  # not reconciled yet (or blocked): the next event or the timer comes back
        raise
    job = build_backup_now_job(kube.api_client().sanitize_for_serialization(cronjob), token)
    try:
        kube.batch().create_namespaced_job(namespace, job, field_manager=FIELD_MANAGER)
    except ApiException as error:
        if error.status != 409:  # 409: already started by an earlier pass
            raise
    status = StatusPatch(body.get("status"), None)
    status.set(backupNow=token)
    status.write(plural=PLURAL, namespace=namespace, name=name)
    kopf.info(body, reason="BackupRequested", message=f"Job {job['metadata']['name']} started on request")


# --- observe: status from the Jobs and the bucket -------------------------------------------------------


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _policy_jobs(namespace: str, policy: str) -> list[dict[str, Any]]:
    """The Jobs of the policy's CronJob (scheduled and backup-now), as plain dicts."""
    owner = cronjob_name(policy)
    jobs = kube.batch().list_namespaced_job(namespace, label_selector=f"{POLICY_LABEL}={policy}").items
    serialize = kube.api_client().sanitize_for_serialization
    return [
        job
        for job in map(serialize, jobs)
        if any(
            r.get("kind") == "CronJob" and r.get("name") == owner for r in job["metadata"].get("ownerReferences", [])
        )
    ]


def observe(namespace: str, name: str) -> None:
    """Derive lastScheduleTime, lastSuccessfulBackup, lastFailure and LastBackupSucceeded from the Jobs."""
    try:
        policy = kopf.Body(kube.custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
    except ApiException as error:
        if error.status == 404:
            return
        raise
    if policy["metadata"].get("deletionTimestamp"):
        return
    try:
        spec = parse_spec(BackupPolicySpec, policy.get("spec"))
    except RunbookError:
        return  # reconcile reports it
    current = policy.get("status") or {}
    status = StatusPatch(current, current.get("observedGeneration"))
    labels = {"namespace": namespace, "policy": name, "source": spec.source.kind}
    jobs = _policy_jobs(namespace, name)
    if jobs:
        newest = max(jobs, key=lambda j: j["metadata"]["creationTimestamp"])
        scheduled = (newest["metadata"].get("annotations") or {}).get(SCHEDULED_AT)
        started = _rfc3339(_time(scheduled or newest["metadata"]["creationTimestamp"]) or datetime.now(UTC))
        if started != current.get("lastScheduleTime"):
            status.set(lastScheduleTime=started)
            kopf.info(policy, reason="BackupStarted", message=f"Job {newest['metadata']['name']} started")
    success = current.get("lastSuccessfulBackup") or {}
    failure = current.get("lastFailure") or {}
    finished = sorted(((job, *outcome) for job in jobs if (outcome := job_outcome(job))), key=lambda t: t[2])
    for job, state, when in finished:
        job_name = job["metadata"]["name"]
        latest = max((t for t in (_time(success.get("time")), _time(failure.get("time"))) if t), default=None)
        if job_name in (success.get("job"), failure.get("job")) or (latest is not None and when < latest):
            continue
        if state == "Complete":
            recorded = _record_success(policy, spec, job, status, labels)
            if recorded is not None:
                success = recorded
                continue
            failure = status.get("lastFailure")
        else:
            reason, message = failure_reason(job, job_pods(kube.KubeApi(), namespace, job_name))
            failure = _record_failure(
                policy, status, job=job_name, when=when, reason=reason, message=message, labels=labels
            )
    _set_metrics(labels, status)
    status.write(plural=PLURAL, namespace=namespace, name=name)


def _record_success(
    policy: kopf.Body,
    spec: BackupPolicySpec,
    job: dict[str, Any],
    status: StatusPatch,
    labels: dict[str, str],
) -> dict[str, Any] | None:
    """Count a Complete Job when its manifest is in the bucket and matches; else record why it does not."""
    namespace, name = policy["metadata"]["namespace"], policy["metadata"]["name"]
    job_name = job["metadata"]["name"]
    location = spec.destination.s3
    manifest: dict[str, Any] | None = None
    try:
        client = s3_client(kube.KubeApi(), namespace, location, field=S3_CREDENTIALS_FIELD)
        created = _time(job["metadata"]["creationTimestamp"]) or datetime.now(UTC)
        manifest = find_manifest(client, location, namespace=namespace, policy=name, job=job_name, created=created)
        problem = "no manifest.json was written" if manifest is None else verify_manifest(client, location, manifest)
    except (RunbookError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        # The bucket cannot be checked right now: decide on the next pass (the policy's timer) instead.
        message = error.message if isinstance(error, RunbookError) else s3_error(error, location).message
        LOG.warning("cannot verify the backup of Job %s yet: %s", job_name, message)
        return None
    outcome = job_outcome(job)
    assert outcome is not None
    if manifest is None or problem is not None:
        _record_failure(
            policy,
            status,
            job=job_name,
            when=outcome[1],
            reason="ManifestMissing",
            message=f"Job succeeded but {problem}",
            labels=labels,
        )
        return None
    data = manifest["data"]
    record = {
        "time": manifest["endTime"],
        "key": data["key"].rsplit("/", 1)[0] + "/",
        "sizeBytes": data["sizeBytes"],
        "sha256": data["sha256"],
        "job": job_name,
    }
    status.set(lastSuccessfulBackup=record)
    status.condition("LastBackupSucceeded", "True", "BackupComplete", f"backup {record['key']} is complete")
    kopf.info(
        policy,
        reason="BackupSucceeded",
        message=f"backup {record['key']} complete: {data['sizeBytes']} bytes, sha256 {data['sha256'][:16]}",
    )
    metrics.BACKUP_DURATION.labels(**labels).set(float(manifest.get("durationSeconds") or 0))
    verified = ((policy.get("status") or {}).get("lastVerifiedBackup") or {}).get("key")
    pruned = prune(
        client,
        location,
        namespace=namespace,
        policy=name,
        retention=spec.retention,
        now=datetime.now(UTC),
        verified=verified,
    )
    if pruned:
        kopf.info(
            policy,
            reason="BackupsPruned",
            message=f"deleted {len(pruned)} backup(s) older than {spec.retention.max_age}: {', '.join(pruned)}"[:1000],
        )
    return record


def _record_failure(
    policy: kopf.Body,
    status: StatusPatch,
    *,
    job: str,
    when: datetime,
    reason: str,
    message: str,
    labels: dict[str, str],
) -> dict[str, Any]:
    record = {"time": _rfc3339(when), "reason": reason, "message": message, "job": job}
    status.set(lastFailure=record)
    status.condition("LastBackupSucceeded", "False", reason, f"Job {job}: {message}")
    kopf.warn(policy, reason="BackupFailed", message=f"Job {job}: {reason}: {message}")
    metrics.BACKUP_FAILURES.labels(**labels).inc()
    return record


def _set_metrics(labels: dict[str, str], status: StatusPatch) -> None:
    """The policy's gauges from its status, so they are right again after the operator restarts."""
    metrics.BACKUP_FAILURES.labels(**labels)  # the series exists at 0 before the first failure
    success = status.get("lastSuccessfulBackup") or {}
    when = _time(success.get("time"))
    if when is not None:
        metrics.BACKUP_LAST_SUCCESS.labels(**labels).set(when.timestamp())
        metrics.BACKUP_SIZE.labels(**labels).set(float(success.get("sizeBytes") or 0))
    failed = _time((status.get("lastFailure") or {}).get("time"))
    if failed is not None:
        metrics.BACKUP_LAST_FAILURE.labels(**labels).set(failed.timestamp())
    verified = _time((status.get("lastVerifiedBackup") or {}).get("verifiedTime"))
    if verified is not None:
        metrics.BACKUP_LAST_VERIFIED.labels(labels["namespace"], labels["policy"]).set(verified.timestamp())
    drill = get_condition(status.get("conditions"), "Verified")
    if drill is not None:
        metrics.BACKUP_LAST_DRILL_PASSED.labels(labels["namespace"], labels["policy"]).set(
            int(drill["status"] == "True")
        )


# --- deletion -------------------------------------------------------------------------------------------


def needs_finalizer(spec: Mapping[str, Any], namespace: str | None) -> bool:
    """Deletion has work to do: delete the backups (deletionPolicy: Delete), or remove an export's RBAC in
    other namespaces (no owner reference can reach them)."""
    exported = ((spec.get("source") or {}).get("kubernetes") or {}).get("namespaces") or []
    return spec.get("deletionPolicy") == "Delete" or any(n != namespace for n in exported)


def finalize(body: kopf.Body, *, retry: int) -> None:
    """Remove what garbage collection cannot; with deletionPolicy Delete, the backups too."""
    metadata = body["metadata"]
    namespace, name = metadata["namespace"], metadata["name"]
    remove_stale_rbac(namespace, name, [])
    if (body.get("spec") or {}).get("deletionPolicy") != "Delete":
        return
    try:
        spec = parse_spec(BackupPolicySpec, body.get("spec"))
        location = spec.destination.s3
        client = s3_client(kube.KubeApi(), namespace, location, field=S3_CREDENTIALS_FIELD)
        folders = [b.folder for b in stored_backups(client, location, namespace, name)]
        delete_backups(client, location, folders)
    except (RunbookError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        message = error.message if isinstance(error, RunbookError) else type(error).__name__
        if retry < 5:
            raise kopf.TemporaryError(f"deleting the backups: {message}", delay=30) from None
        kopf.warn(body, reason="BackupsNotDeleted", message=f"gave up deleting the backups: {message}")
        return
    kopf.info(body, reason="BackupsDeleted", message=f"deleted {len(folders)} backup(s) (deletionPolicy Delete)")
