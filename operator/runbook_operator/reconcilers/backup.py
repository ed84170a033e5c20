"""BackupPolicy: converge the CronJob, and derive status from facts.

``reconcile`` checks what the pods will need (the referenced Secret keys, the recipients' public keys, the
bucket), installs the bucket's lifecycle rule for abandoned multipart uploads, applies the children, then
``observe``s the policy's Jobs and acts on a ``backup_now`` request. ``observe``: a Job that succeeded
counts only when its manifest is in the bucket and matches (then expired backups are pruned); a Job that
failed is recorded with the agent's one-line reason. Each step is level-based: running it again changes
nothing. The Job watcher and the backup-now annotation run their one step through ``pass_named``.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import botocore.exceptions
from croniter import croniter

from .. import metrics
from ..builders.backup import (
    POLICY_LABEL,
    build_backup_now_job,
    build_cronjob,
    build_manifest_key,
    cronjob_name,
    export_service_account,
)
from ..builders.common import contains
from ..clients import kube
from ..clients.gpg import GPG
from ..errors import RunbookError
from ..logs import REDACTOR
from ..models.backup import (
    BACKUP_NOW,
    BackupPolicyPhase,
    BackupPolicySpec,
    BackupPolicyStatus,
    BackupRecord,
    FailureRecord,
)
from ..models.common import parse_time, rfc3339
from ..models.plans import MANIFEST_KEY_SECRET, MANIFEST_KEY_SECRET_KEY, policy_folder
from ..models.sources import TLS_CERT_KEY, TLS_KEY_KEY, GPGEncryption
from ..settings import agent_image
from . import tenancy
from .catalog import (
    S3_CREDENTIALS_FIELD,
    check_bucket,
    delete_backups,
    find_manifest,
    prune,
    s3_client,
    s3_error,
    stored_backups,
    verify_manifest,
)
from .jobs import failure_reason, job_outcome, job_pods
from .runtime import Context, GrantsOf, Reconciler, Result, run_pass

LOG = logging.getLogger(__name__)
SCHEDULED_AT = "batch.kubernetes.io/cronjob-scheduled-timestamp"

PolicyContext = Context[BackupPolicySpec, BackupPolicyStatus]
Step = Callable[[PolicyContext], Result]


# --- the policy's children ------------------------------------------------------------------------------

CHILDREN = {r.kind: r for r in (kube.CRON_JOBS,)}


def apply_child(api: kube.Api, desired: dict[str, Any]) -> bool:
    """Server-side apply unless the live object already has every desired value; whether it applied."""
    resource = CHILDREN[desired["kind"]]
    namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    current = api.get(resource, namespace, name)
    if current is not None and contains(current, desired):
        return False
    api.apply(resource, namespace, desired)
    return True


# --- reconcile ------------------------------------------------------------------------------------------


def check_references(api: kube.Api, namespace: str, spec: BackupPolicySpec) -> None:
    """Every Secret key and the recipients' keys the pod will need exist and are usable."""
    secret_refs: list[tuple[str, str, str]] = []
    source = spec.source
    if source.postgresql is not None:
        ref = source.postgresql.credentials_secret_ref
        field = "spec.source.postgresql.credentialsSecretRef"
        # the user name is read without registering it with the redactor: `postgres` would scrub the word
        kube.secret_value(api, namespace, ref.name, ref.username_key, field=field, redact=False)
        secret_refs.append((ref.name, ref.password_key, field))
        if source.postgresql.tls is not None:
            ca = source.postgresql.tls.ca_secret_ref
            secret_refs.append((ca.name, ca.key, "spec.source.postgresql.tls.caSecretRef"))
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
        kube.secret_value(api, namespace, secret, key, field=field)
    if gpg.recipients_config_map_ref is not None:
        ref_cm = gpg.recipients_config_map_ref
        field = "spec.encryption.gpg.recipientsConfigMapRef"
        armored = kube.config_map_value(api, namespace, ref_cm.name, ref_cm.key, field=field)
        with GPG() as keyring:
            keyring.import_public_keys(armored, field=field, fingerprints=gpg.fingerprints)


def recipients_pinned(ctx: Context[Any, Any], gpg: GPGEncryption, field: str) -> None:
    """The RecipientsPinned condition of public-key encryption (``field`` names the gpg settings): False,
    reason NotPinned, when the keys are used as the ConfigMap holds them (not a failure: Ready stays True)."""
    if gpg.recipients_config_map_ref is None:
        return
    if gpg.fingerprints:
        ctx.condition("RecipientsPinned", "True", "Pinned", f"the recipients' keys are exactly {field}.fingerprints")
        return
    ctx.condition(
        "RecipientsPinned",
        "False",
        "NotPinned",
        f"{field}.fingerprints is empty: whoever may edit ConfigMap {gpg.recipients_config_map_ref.name} can "
        f"swap in another key; list the recipients' fingerprints (gpg --with-colons --fingerprint) in "
        f"{field}.fingerprints to pin them",
    )


def ensure_manifest_key(api: kube.Api, namespace: str) -> None:
    """The namespace's manifest signing key exists (created when absent, never overwritten: a 409 means
    another pass made it) and its value is one the log redactor scrubs."""
    field = f"Secret {MANIFEST_KEY_SECRET} (the namespace's manifest signing key)"
    try:
        kube.secret_value(api, namespace, MANIFEST_KEY_SECRET, MANIFEST_KEY_SECRET_KEY, field=field)
        return
    except RunbookError as missing:
        if missing.reason != "SecretNotFound":
            raise
    value = secrets.token_hex(32)
    REDACTOR.register(value)
    if not api.create(kube.SECRETS, namespace, build_manifest_key(namespace, value)):  # another pass made it
        kube.secret_value(api, namespace, MANIFEST_KEY_SECRET, MANIFEST_KEY_SECRET_KEY, field=field)


def check_export_account(api: kube.Api, namespace: str, spec: BackupPolicySpec) -> None:
    """A Kubernetes export's pods run as the ServiceAccount a cluster administrator created when enabling
    the namespace (the operator makes none): it must exist."""
    account = export_service_account(spec)
    if account is not None and api.get(kube.SERVICE_ACCOUNTS, namespace, account) is None:
        raise RunbookError(
            "ServiceAccountMissing",
            f"spec.source.kubernetes: ServiceAccount {account} not found in namespace {namespace}; a cluster "
            "administrator creates it when enabling the namespace (deploy/base/namespace-enable/)",
            retry_after=60,
        )


def reconcile(ctx: PolicyContext) -> Result:
    """Converge the children and the Ready condition, then status from the Jobs and a backup-now request.
    A failure leaves phase Invalid (the spec) or Blocked (anything after it)."""
    try:
        spec = ctx.spec
    except RunbookError:
        ctx.status.phase = BackupPolicyPhase.INVALID
        raise
    ctx.status.phase = BackupPolicyPhase.BLOCKED  # until this pass gets through
    namespace, name = ctx.namespace, ctx.name
    spec = confine(ctx, spec)
    source = spec.source
    ctx.plaintext(
        tenancy.plaintext_in_use(("spec.source.postgresql", source.postgresql), ("spec.source.redis", source.redis))
    )
    ctx.status.source_kind = spec.source.kind
    ctx.status.cron_job_name = cronjob_name(name)
    check_references(ctx.api, namespace, spec)
    check_export_account(ctx.api, namespace, spec)
    ensure_manifest_key(ctx.api, namespace)
    recipients_pinned(ctx, spec.encryption.gpg, "spec.encryption.gpg")
    location = spec.destination.s3
    check_bucket(s3_client(ctx.api, namespace, location, field=S3_CREDENTIALS_FIELD), location)
    uid = str(ctx.body["metadata"]["uid"])
    cronjob = build_cronjob(
        spec, namespace=namespace, policy=name, uid=uid, generation=ctx.generation or 1, image=agent_image()
    )
    if apply_child(ctx.api, cronjob):
        ctx.event("Normal", "CronJobApplied", f"CronJob {cronjob_name(name)}: {spec.schedule}")
    where = f"s3://{location.bucket}/{policy_folder(location, namespace, name)}"
    if spec.suspend:
        ctx.condition("Ready", "True", "Suspended", f"scheduled backups are suspended; backups go to {where}")
    else:
        ctx.condition("Ready", "True", "Scheduled", f"backs up on '{spec.schedule}' ({spec.time_zone}) to {where}")
    series = (namespace, name, spec.source.kind)
    if spec.suspend:
        metrics.BACKUP_SCHEDULE_INTERVAL.remove(*series)  # a suspended policy is never overdue
    else:
        metrics.BACKUP_SCHEDULE_INTERVAL.labels(*series).set(schedule_interval(spec.schedule, spec.time_zone))
    observe(ctx)
    backup_now(ctx)
    ctx.status.phase = BackupPolicyPhase.SUSPENDED if spec.suspend else BackupPolicyPhase.SCHEDULED
    return Result.done()


def confine(ctx: PolicyContext, spec: BackupPolicySpec) -> BackupPolicySpec:
    """``spec`` (the pass's) as the tenancy rules allow it (``tenancy.confine_backup_policy``): every later
    ``ctx.spec`` of the pass is that one. Before any Secret is read, any connection made or any child applied."""
    return ctx.confine(tenancy.confine_backup_policy(ctx.api, ctx.grants(ctx.namespace), ctx.namespace, spec))


def schedule_interval(schedule: str, time_zone: str, *, runs: int = 64) -> float:
    """The longest gap in seconds between consecutive runs of ``schedule`` over its next ``runs`` runs, in
    its time zone (a weekday-only schedule's weekend, a month's 31 days, a DST night's extra hour count)."""
    starts = croniter(schedule, datetime.now(ZoneInfo(time_zone)))
    times = [starts.get_next(datetime) for _ in range(runs + 1)]
    return max((b - a).total_seconds() for a, b in itertools.pairwise(times))


def backup_now(ctx: PolicyContext) -> Result:
    """A new value of the backup-now annotation starts one Job from the CronJob's template. (kopf ignores
    annotations under its own prefix, so main.py runs this on every event rather than as a change handler.)"""
    token = (ctx.body["metadata"].get("annotations") or {}).get(BACKUP_NOW)
    if not token or token == ctx.status.backup_now:
        return Result.done()
    cronjob = ctx.api.get(kube.CRON_JOBS, ctx.namespace, cronjob_name(ctx.name))
    if cronjob is None:
        return Result.done()  # not reconciled yet (or blocked): the next event or the timer comes back
    job = build_backup_now_job(cronjob, token)
    ctx.api.create(kube.JOBS, ctx.namespace, job)  # False: already started by an earlier pass
    ctx.status.backup_now = token
    ctx.event("Normal", "BackupRequested", f"Job {job['metadata']['name']} started on request")
    return Result.done()


def pass_named(api: kube.Api, namespace: str, name: str, step: Step, grants: GrantsOf | None = None) -> Result:
    """One pass of ``step`` over the policy as it is now (the Job watcher and backup-now know only its
    name, or hold an older copy); nothing when it is gone or being deleted."""
    body = api.get(POLICY.resource, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Result.done()

    def confined(ctx: PolicyContext) -> Result:
        try:
            spec = ctx.spec
        except RunbookError:
            return step(ctx)  # reconcile reports an invalid spec
        confine(ctx, spec)
        return step(ctx)

    return run_pass(Context.of(POLICY, body, api, grants=grants), confined)


# --- observe: status from the Jobs and the bucket -------------------------------------------------------


def _policy_jobs(api: kube.Api, namespace: str, policy: str) -> list[dict[str, Any]]:
    """The Jobs of the policy's CronJob (scheduled and backup-now)."""
    owner = cronjob_name(policy)
    return [
        job
        for job in api.list(kube.JOBS, namespace, labels=f"{POLICY_LABEL}={policy}")
        if any(
            r.get("kind") == "CronJob" and r.get("name") == owner for r in job["metadata"].get("ownerReferences", [])
        )
    ]


def observe(ctx: PolicyContext) -> Result:
    """Derive lastScheduleTime, lastSuccessfulBackup, lastFailure and LastBackupSucceeded from the Jobs."""
    if ctx.body["metadata"].get("deletionTimestamp"):
        return Result.done()
    try:
        spec = ctx.spec
    except RunbookError:
        return Result.done()  # reconcile reports it
    namespace, status = ctx.namespace, ctx.status
    labels = {"namespace": namespace, "policy": ctx.name, "source": spec.source.kind}
    jobs = _policy_jobs(ctx.api, namespace, ctx.name)
    if jobs:
        newest = max(jobs, key=lambda j: j["metadata"]["creationTimestamp"])
        scheduled = (newest["metadata"].get("annotations") or {}).get(SCHEDULED_AT)
        started = rfc3339(parse_time(scheduled or newest["metadata"]["creationTimestamp"]) or ctx.now())
        if started != status.last_schedule_time:
            status.last_schedule_time = started
            ctx.event("Normal", "BackupStarted", f"Job {newest['metadata']['name']} started")
    success, failure = status.last_successful_backup, status.last_failure
    finished = sorted(((job, *outcome) for job in jobs if (outcome := job_outcome(job))), key=lambda t: t[2])
    for job, state, when in finished:
        job_name = job["metadata"]["name"]
        seen = [r for r in (success, failure) if r is not None]
        latest = max((t for r in seen if (t := parse_time(r.time))), default=None)
        if job_name in [r.job for r in seen] or (latest is not None and when < latest):
            continue
        if state == "Complete":
            recorded = _record_success(ctx, spec, job, labels)
            if recorded is not None:
                success = recorded
                continue
            failure = status.last_failure
        else:
            reason, message = failure_reason(job, job_pods(ctx.api, namespace, job_name))
            failure = _record_failure(ctx, job=job_name, when=when, reason=reason, message=message, labels=labels)
    _set_metrics(labels, status)
    return Result.done()


def _record_success(
    ctx: PolicyContext, spec: BackupPolicySpec, job: Mapping[str, Any], labels: dict[str, str]
) -> BackupRecord | None:
    """Count a Complete Job when its manifest is in the bucket and matches; else record why it does not."""
    namespace, name = ctx.namespace, ctx.name
    job_name = job["metadata"]["name"]
    location = spec.destination.s3
    try:
        client = s3_client(ctx.api, namespace, location, field=S3_CREDENTIALS_FIELD)
        created = parse_time(job["metadata"]["creationTimestamp"]) or ctx.now()
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
            ctx,
            job=job_name,
            when=outcome[1],
            reason="ManifestMissing",
            message=f"Job succeeded but {problem}",
            labels=labels,
        )
        return None
    data = manifest["data"]
    record = BackupRecord(
        time=manifest["endTime"],
        key=data["key"].rsplit("/", 1)[0] + "/",
        size_bytes=data["sizeBytes"],
        sha256=data["sha256"],
        job=job_name,
    )
    ctx.status.last_successful_backup = record
    ctx.condition("LastBackupSucceeded", "True", "BackupComplete", f"backup {record.key} is complete")
    ctx.event(
        "Normal",
        "BackupSucceeded",
        f"backup {record.key} complete: {data['sizeBytes']} bytes, sha256 {data['sha256'][:16]}",
    )
    metrics.BACKUP_DURATION.labels(**labels).set(float(manifest.get("durationSeconds") or 0))
    verified = ctx.status.last_verified_backup.key if ctx.status.last_verified_backup is not None else None
    pruned = prune(
        client, location, namespace=namespace, policy=name, retention=spec.retention, now=ctx.now(), verified=verified
    )
    if pruned:
        ctx.event(
            "Normal",
            "BackupsPruned",
            f"deleted {len(pruned)} backup(s) older than {spec.retention.max_age}: {', '.join(pruned)}"[:1000],
        )
    return record


def _record_failure(
    ctx: PolicyContext, *, job: str, when: datetime, reason: str, message: str, labels: dict[str, str]
) -> FailureRecord:
    record = FailureRecord(time=rfc3339(when), reason=reason, message=message, job=job)
    ctx.status.last_failure = record
    ctx.condition("LastBackupSucceeded", "False", reason, f"Job {job}: {message}")
    ctx.event("Warning", "BackupFailed", f"Job {job}: {reason}: {message}")
    metrics.BACKUP_FAILURES.labels(**labels).inc()
    return record


def _set_metrics(labels: dict[str, str], status: BackupPolicyStatus) -> None:
    """The policy's gauges from its status, so they are right again after the operator restarts."""
    metrics.BACKUP_FAILURES.labels(**labels)  # the series exists at 0 before the first failure
    success = status.last_successful_backup
    when = parse_time(success.time) if success is not None else None
    if success is not None and when is not None:
        metrics.BACKUP_LAST_SUCCESS.labels(**labels).set(when.timestamp())
        metrics.BACKUP_SIZE.labels(**labels).set(float(success.size_bytes or 0))
    failed = parse_time(status.last_failure.time) if status.last_failure is not None else None
    if failed is not None:
        metrics.BACKUP_LAST_FAILURE.labels(**labels).set(failed.timestamp())
    verified_backup = status.last_verified_backup
    verified = parse_time(verified_backup.verified_time) if verified_backup is not None else None
    if verified is not None:
        metrics.BACKUP_LAST_VERIFIED.labels(labels["namespace"], labels["policy"]).set(verified.timestamp())
    drill = next((c for c in status.conditions if c.type == "Verified"), None)
    if drill is not None:
        metrics.BACKUP_LAST_DRILL_PASSED.labels(labels["namespace"], labels["policy"]).set(int(drill.status == "True"))


# --- deletion -------------------------------------------------------------------------------------------


def needs_finalizer(spec: Mapping[str, Any]) -> bool:
    """Deletion has work to do: delete the backups (deletionPolicy: Delete)."""
    return spec.get("deletionPolicy") == "Delete"


def finalize(ctx: PolicyContext) -> Result:
    """With deletionPolicy Delete, delete the backups (main.py gives up after a few attempts, so an
    unreachable bucket does not hold the policy forever)."""
    if (ctx.body.get("spec") or {}).get("deletionPolicy") != "Delete":
        return Result.done()
    try:
        location = confine(ctx, ctx.spec).destination.s3
        client = s3_client(ctx.api, ctx.namespace, location, field=S3_CREDENTIALS_FIELD)
        folders = [b.folder for b in stored_backups(client, location, ctx.namespace, ctx.name)]
        delete_backups(client, location, folders)
    except (RunbookError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        message = error.message if isinstance(error, RunbookError) else type(error).__name__
        raise RunbookError("BackupsNotDeleted", f"deleting the backups: {message}", retry_after=30) from None
    ctx.event("Normal", "BackupsDeleted", f"deleted {len(folders)} backup(s) (deletionPolicy Delete)")
    return Result.done()


POLICY = Reconciler(
    kube.custom_resource("backuppolicies", "BackupPolicy"), BackupPolicySpec, BackupPolicyStatus, reconcile, finalize
)
