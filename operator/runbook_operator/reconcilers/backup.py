"""BackupPolicy: converge the CronJob, and derive status from facts.

``reconcile`` ``observe``s the policy's Jobs, checks what the pods will need (the referenced Secret keys, the
recipients' public keys, the bucket), installs the bucket's lifecycle rule for abandoned multipart uploads,
applies the CronJob, and acts on a ``backup_now`` request. ``observe``: a Job that succeeded counts only when
its manifest is in the bucket and matches (then expired backups are pruned); a Job that failed is recorded with
the agent's one-line reason. Each step is level-based: running it again changes nothing.

When a pass runs is ``PASSES``'s decision (level-triggered, as controller-runtime's GenerationChangedPredicate):
on a new generation or backup-now token, when the CronJob differs from what the last pass applied (edited or
deleted by hand), when a Job started or finished that status does not show yet, as a retry, and every
``RECHECK`` seconds. An unchanged policy at rest costs no API call at all.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import json
import logging
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast
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
from . import tenancy, wal
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
from .runtime import UNEXPECTED_RETRY, Context, GrantsOf, Reconciler, Result, as_failure, backoff, blocking, run_pass

LOG = logging.getLogger(__name__)
SCHEDULED_AT = "batch.kubernetes.io/cronjob-scheduled-timestamp"
# Seconds an unchanged policy's reference checks (Secrets, the recipients' keys, the manifest key) are trusted
# without a change of the policy, its CronJob or its Jobs: a Secret deleted meanwhile shows when the next Job
# fails (its pass re-checks) or at this re-check, whichever comes first.
RECHECK = 12 * 3600.0
VERIFY_LATER = 60.0  # seconds until a Complete Job whose bucket could not be read is looked at again

PolicyContext = Context[BackupPolicySpec, BackupPolicyStatus]
Step = Callable[[PolicyContext], Result]


# --- the policy's children ------------------------------------------------------------------------------

CHILDREN = {r.kind: r for r in (kube.CRON_JOBS,)}


def apply_child(api: kube.Api, desired: dict[str, Any]) -> str | None:
    """Server-side apply unless the live object already has every desired value: None when nothing was
    applied, else "created" or "changed"."""
    resource = CHILDREN[desired["kind"]]
    namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    if isinstance(api, Watched):
        api.converged = desired
    current = api.get(resource, namespace, name)
    if current is not None and contains(current, desired):
        return None
    api.apply(resource, namespace, desired)
    return "created" if current is None else "changed"


class SharedReads:
    """GETs of Secrets and ConfigMaps shared by concurrent passes, never older than a pass's own: a pass that
    began at ``began`` (monotonic) takes the answer of a request sent at or after that moment, or waits for
    one in flight that was (it sees what its own GET would have seen, had it been sent then); else it asks.
    With 20 passes of one namespace queued, one GET of its Secret serves them; one pass alone reads as before."""

    KEEP = 30.0  # seconds an answer is kept for passes that began before it was asked for

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._asked: dict[tuple[str, str, str], tuple[float, Future[dict[str, Any] | None]]] = {}

    def get(self, api: kube.Api, resource: kube.Resource, namespace: str, name: str, began: float) -> Any:
        key = (resource.plural, namespace, name)
        with self._lock:
            asked = self._asked.get(key)
            if asked is not None and asked[0] >= began:
                answer = asked[1]
            else:
                now = time.monotonic()
                if len(self._asked) > 64:
                    self._asked = {k: a for k, a in self._asked.items() if now - a[0] < self.KEEP}
                answer = Future()
                self._asked[key] = (now, answer)  # taken before the request is sent: never later than it
                asked = None
        if asked is not None:
            return answer.result()
        try:
            found = api.get(resource, namespace, name)
        except BaseException as error:
            answer.set_exception(error)
            with self._lock:
                if self._asked.get(key, (0.0, None))[1] is answer:
                    del self._asked[key]
            raise
        answer.set_result(found)
        return found

    def forget(self, resource: kube.Resource, namespace: str, name: str) -> None:
        with self._lock:
            self._asked.pop((resource.plural, namespace, name), None)


SHARED_READS = SharedReads()


class ReadOnce:
    """``api`` whose GETs of Secrets and ConfigMaps are made once per pass: a pass reads one Secret for each
    of its keys (the user name and the password, the S3 key id and its secret); within ``Passes``, shared
    with the passes that run at the same time (``SharedReads``). Everything else is ``api``'s."""

    CACHED = frozenset({kube.SECRETS.plural, kube.CONFIG_MAPS.plural})

    def __init__(self, api: kube.Api) -> None:
        self._api = api
        self._read: dict[tuple[str, str, str], dict[str, Any] | None] = {}

    @classmethod
    def over(cls, api: kube.Api) -> kube.Api:
        return cast(kube.Api, cls(api))

    def get(self, resource: kube.Resource, namespace: str, name: str) -> dict[str, Any] | None:
        if resource.plural not in self.CACHED:
            return self._api.get(resource, namespace, name)
        key = (resource.plural, namespace, name)
        if key not in self._read:
            began = self._api.began if isinstance(self._api, Watched) else None
            if began is None:
                self._read[key] = self._api.get(resource, namespace, name)
            else:
                self._read[key] = SHARED_READS.get(self._api, resource, namespace, name, began)
        return self._read[key]

    def create(self, resource: kube.Resource, namespace: str, body: Mapping[str, Any]) -> bool:
        self._read.pop((resource.plural, namespace, str(body["metadata"]["name"])), None)
        SHARED_READS.forget(resource, namespace, str(body["metadata"]["name"]))
        return self._api.create(resource, namespace, body)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)


class Watched:
    """``api`` for one pass of ``Passes``: the policy's Jobs and whether its CronJob exists answered from the
    watches (kopf's indexes ``main.backup_cronjobs`` / ``main.backup_jobs``: kopf runs no handler before every
    index has its initial listing, so they are complete) as they were when the pass began: a new policy's pass
    neither GETs its CronJob (absent: a 404) nor LISTs its Jobs. A CronJob the index has is read (a pass
    compares all of it with what it would apply; the index keeps only its uid); the one the pass applies is
    what it reads back. ``began``: when the pass was asked for (``SharedReads``); ``converged``: the CronJob
    the pass converged to (``apply_child``). Everything else is ``api``'s."""

    def __init__(
        self,
        api: kube.Api,
        key: tuple[str, str],
        *,
        began: float | None = None,
        cronjob: bool = True,
        jobs: list[dict[str, Any]] | None = None,
        indexed: bool = False,
    ) -> None:
        self._api = api
        self._namespace, self._policy = key
        self._cronjob_exists = cronjob
        self._applied: dict[str, Any] | None = None
        self._jobs = jobs or []
        self._indexed = indexed
        self.began = began
        self.converged: dict[str, Any] | None = None

    def get(self, resource: kube.Resource, namespace: str, name: str) -> dict[str, Any] | None:
        if self._is_cronjob(resource, namespace, name):
            if self._applied is not None:
                return self._applied
            if self._indexed and not self._cronjob_exists:
                return None
        return self._api.get(resource, namespace, name)

    def list(
        self, resource: kube.Resource, namespace: str | None, *, labels: str | None = None
    ) -> list[dict[str, Any]]:
        if self._indexed and resource == kube.JOBS and namespace == self._namespace and labels == self._selector:
            return list(self._jobs)
        return self._api.list(resource, namespace, labels=labels)

    def apply(self, resource: kube.Resource, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        applied = self._api.apply(resource, namespace, body)
        if self._is_cronjob(resource, namespace, str(body["metadata"]["name"])):
            self._applied = applied
        return applied

    def create(self, resource: kube.Resource, namespace: str, body: Mapping[str, Any]) -> bool:
        return self._api.create(resource, namespace, body)

    @property
    def _selector(self) -> str:
        return f"{POLICY_LABEL}={self._policy}"

    def _is_cronjob(self, resource: kube.Resource, namespace: str, name: str) -> bool:
        return resource == kube.CRON_JOBS and namespace == self._namespace and name == cronjob_name(self._policy)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)


def _owned_by(metadata: Mapping[str, Any], policy: str) -> bool:
    owner = cronjob_name(policy)
    return any(r.get("kind") == "CronJob" and r.get("name") == owner for r in metadata.get("ownerReferences") or [])


def cronjob_index_entry(body: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    """``main.backup_cronjobs``: (namespace, policy) -> the uid of the policy's CronJob (that it exists)."""
    metadata = body["metadata"]
    policy = (metadata.get("labels") or {}).get(POLICY_LABEL)
    if not policy or metadata.get("name") != cronjob_name(policy):
        return {}
    return {(str(metadata["namespace"]), str(policy)): str(metadata.get("uid"))}


def job_index_entry(body: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """``main.backup_jobs``: (namespace, policy) -> what ``observe`` reads of a Job of the policy's CronJob (its
    name, creation and scheduled time, owner, and conditions)."""
    metadata = body["metadata"]
    policy = (metadata.get("labels") or {}).get(POLICY_LABEL)
    if not policy or not _owned_by(metadata, str(policy)):
        return {}
    scheduled = (metadata.get("annotations") or {}).get(SCHEDULED_AT)
    job = {
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "creationTimestamp": metadata.get("creationTimestamp"),
            "annotations": {SCHEDULED_AT: scheduled} if scheduled else {},
            "ownerReferences": [{"kind": "CronJob", "name": cronjob_name(str(policy))}],
        },
        "status": {"conditions": list((body.get("status") or {}).get("conditions") or [])},
    }
    return {(str(metadata["namespace"]), str(policy)): job}


class Checked:
    """Outcomes of checks that depend only on what they are keyed by, trusted for ``RECHECK`` seconds (memory
    only; thread-safe enough: a lost race means one check too many)."""

    def __init__(self) -> None:
        self._when: dict[str, float] = {}

    def fresh(self, key: str) -> bool:
        when = self._when.get(key)
        return when is not None and time.monotonic() - when < RECHECK

    def passed(self, key: str) -> None:
        now = time.monotonic()
        if len(self._when) > 4096:  # bounded: drop what is stale anyway
            self._when = {k: t for k, t in self._when.items() if now - t < RECHECK}
        self._when[key] = now

    def forget(self, key: str) -> None:
        self._when.pop(key, None)


# The recipients' keys by content (the armored keys and the pinned fingerprints): gpg runs once per content,
# not once per pass. The namespaces whose manifest signing key was seen (forgotten when a Job there fails).
RECIPIENTS_CHECKED = Checked()
MANIFEST_KEYS = Checked()
MANIFEST_KEY_LOCKS: dict[str, threading.Lock] = {}  # one per namespace (dict.setdefault is atomic)


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
        content = hashlib.sha256("\0".join([armored, *gpg.fingerprints]).encode()).hexdigest()
        if RECIPIENTS_CHECKED.fresh(content):
            return
        with GPG() as keyring:
            keyring.import_public_keys(armored, field=field, fingerprints=gpg.fingerprints)
        RECIPIENTS_CHECKED.passed(content)


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
    another pass made it) and its value is one the log redactor scrubs; once per namespace and ``RECHECK``."""
    with MANIFEST_KEY_LOCKS.setdefault(namespace, threading.Lock()):  # the namespace's other passes wait
        if MANIFEST_KEYS.fresh(namespace):  # seen (and its value registered) by an earlier pass
            return
        field = f"Secret {MANIFEST_KEY_SECRET} (the namespace's manifest signing key)"
        try:
            kube.secret_value(api, namespace, MANIFEST_KEY_SECRET, MANIFEST_KEY_SECRET_KEY, field=field)
        except RunbookError as missing:
            if missing.reason != "SecretNotFound":
                raise
            value = secrets.token_hex(32)
            REDACTOR.register(value)
            if not api.create(kube.SECRETS, namespace, build_manifest_key(namespace, value)):  # another operator's
                kube.secret_value(api, namespace, MANIFEST_KEY_SECRET, MANIFEST_KEY_SECRET_KEY, field=field)
        MANIFEST_KEYS.passed(namespace)


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
    """Status from the Jobs (facts, whatever the references say now), then converge the CronJob and the Ready
    condition, then a backup-now request. A failure leaves phase Invalid (the spec) or Blocked (anything
    after it). Reads each referenced Secret once; writes only what differs (creation: the CronJob and status)."""
    try:
        spec = ctx.spec
    except RunbookError:
        ctx.status.phase = BackupPolicyPhase.INVALID
        raise
    ctx.status.phase = BackupPolicyPhase.BLOCKED  # until this pass gets through
    namespace, name = ctx.namespace, ctx.name
    spec = confine(ctx, spec)
    later = observe(ctx)
    api = ReadOnce.over(ctx.api)
    source = spec.source
    ctx.plaintext(
        tenancy.plaintext_in_use(("spec.source.postgresql", source.postgresql), ("spec.source.redis", source.redis))
    )
    ctx.status.source_kind = spec.source.kind
    ctx.status.cron_job_name = cronjob_name(name)
    check_references(api, namespace, spec)
    check_export_account(api, namespace, spec)
    ensure_manifest_key(api, namespace)
    recipients_pinned(ctx, spec.encryption.gpg, "spec.encryption.gpg")
    location = spec.destination.s3
    check_bucket(s3_client(api, namespace, location, field=S3_CREDENTIALS_FIELD), location)
    if apply_child(ctx.api, desired_cronjob(ctx)) == "changed":  # a creation is told by status (cronJobName)
        ctx.event("Normal", "CronJobApplied", f"CronJob {cronjob_name(name)} updated to the policy: {spec.schedule}")
    if spec.wal is not None or ctx.status.wal is not None:  # continuous WAL archiving: reconcilers/wal.py
        later = wal.reconcile(ctx, spec, later)
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
    backup_now(ctx)
    ctx.status.phase = BackupPolicyPhase.SUSPENDED if spec.suspend else BackupPolicyPhase.SCHEDULED
    return later


def desired_cronjob(ctx: PolicyContext) -> dict[str, Any]:
    """The CronJob of the pass's (confined) spec."""
    uid = str(ctx.body["metadata"]["uid"])
    return build_cronjob(
        ctx.spec, namespace=ctx.namespace, policy=ctx.name, uid=uid, generation=ctx.generation or 1, image=agent_image()
    )


def confine(ctx: PolicyContext, spec: BackupPolicySpec) -> BackupPolicySpec:
    """``spec`` (the pass's) as the tenancy rules allow it (``tenancy.confine_backup_policy``): every later
    ``ctx.spec`` of the pass is that one. Before any Secret is read, any connection made or any child applied."""
    return ctx.confine(tenancy.confine_backup_policy(ctx.api, ctx.grants(ctx.namespace), ctx.namespace, spec))


def schedule_interval(schedule: str, time_zone: str, *, runs: int = 64) -> float:
    """The longest gap in seconds between consecutive runs of ``schedule`` over its next ``runs`` runs, in
    its time zone (a weekday-only schedule's weekend, a month's 31 days, a DST night's extra hour count);
    computed once per schedule, time zone and hour (croniter is most of a pass's CPU otherwise)."""
    return _schedule_interval(schedule, time_zone, runs, int(time.time() // 3600))


@functools.lru_cache(maxsize=256)
def _schedule_interval(schedule: str, time_zone: str, runs: int, _hour: int) -> float:
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


def run_step(
    api: kube.Api, body: Mapping[str, Any], step: Step, grants: GrantsOf | None = None, failures: int = 0
) -> tuple[Result, PolicyContext]:
    """One pass of ``step`` over ``body`` (its spec confined by the tenancy rules first), blocking; the pass's
    context comes back too (what it applied is derived from it)."""

    def confined(ctx: PolicyContext) -> Result:
        try:
            spec = ctx.spec
        except RunbookError:
            return step(ctx)  # reconcile reports an invalid spec
        confine(ctx, spec)
        return step(ctx)

    ctx = Context.of(POLICY, body, api, grants=grants)
    return run_pass(ctx, step if step is reconcile else confined, failures=failures), ctx


def pass_named(api: kube.Api, namespace: str, name: str, step: Step, grants: GrantsOf | None = None) -> Result:
    """One pass of ``step`` over the policy as it is now (for callers that know only its name, or hold an
    older copy); nothing when it is gone or being deleted."""
    body = api.get(POLICY.resource, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Result.done()
    return run_step(api, body, step, grants)[0]


# --- when a pass runs -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Known:
    """What the operator remembers of one policy between passes. Memory only: after a restart the first event
    of each policy finds nothing known and runs a full pass."""

    uid: str | None = None
    generation: int | None = None  # of the last full pass (None: none yet)
    token: str | None = None  # the backup-now token the last pass handled
    cronjob: bytes | None = None  # what the last good pass converged the CronJob to (``compact``)
    status: Mapping[str, Any] = field(default_factory=dict)  # ``reflecting`` the status its latest event showed
    failures: int = 0  # consecutive failed passes (the retry's backoff)
    grants: GrantsOf | None = None
    timer: asyncio.TimerHandle | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def wanted(known: Known | None, body: Mapping[str, Any]) -> Step | None:
    """The pass a policy event asks for: a full one on first sight or a new generation, the backup-now step
    for a new token, else none (an event of our own status write, a label, a re-listing)."""
    metadata = body["metadata"]
    if metadata.get("deletionTimestamp"):
        return None  # its finalizer (deletionPolicy Delete) takes over
    if known is None or known.uid != metadata["uid"] or known.generation != metadata.get("generation"):
        return reconcile
    token = (metadata.get("annotations") or {}).get(BACKUP_NOW)
    if token and token not in (known.token, (body.get("status") or {}).get("backupNow")):
        return backup_now
    return None


REFLECTING = ("lastScheduleTime", "lastSuccessfulBackup", "lastFailure")


def reflecting(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``job_reflected`` reads of a policy's status (all ``Known`` keeps of it)."""
    return {k: status[k] for k in REFLECTING if k in status} if status else {}


def compact(document: Mapping[str, Any]) -> bytes:
    """``document`` as compressed JSON: a CronJob in 1.4 KiB instead of the 18 KiB of its dicts (``Known``)."""
    return zlib.compress(json.dumps(document, separators=(",", ":")).encode())


def converged_to(known: Known) -> dict[str, Any] | None:
    return json.loads(zlib.decompress(known.cronjob)) if known.cronjob is not None else None


def job_reflected(status: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    """Whether the policy's status already shows what ``job`` says (``observe`` would change nothing for it):
    its start in lastScheduleTime, its outcome in lastSuccessfulBackup or lastFailure, or a newer one there."""
    outcome = job_outcome(job)
    if outcome is None:
        scheduled = (job["metadata"].get("annotations") or {}).get(SCHEDULED_AT)
        started = parse_time(scheduled or job["metadata"].get("creationTimestamp"))
        shown = parse_time(status.get("lastScheduleTime"))
        return started is not None and shown is not None and shown >= started
    records = [r for r in (status.get("lastSuccessfulBackup"), status.get("lastFailure")) if r]
    if job["metadata"]["name"] in [r.get("job") for r in records]:
        return True
    latest = max((t for r in records if (t := parse_time(r.get("time")))), default=None)
    return latest is not None and outcome[1] < latest


class Passes:
    """Every BackupPolicy's passes: at most one at a time per policy, started by the kopf events main.py hands
    over (of the policies, their CronJobs and their Jobs), and the next one timed (a retry, a deferred
    verification, the ``RECHECK``). Events that change nothing the pass depends on cost no API call."""

    def __init__(self, api: Callable[[], kube.Api] = kube.KubeApi, recheck: float = RECHECK) -> None:
        self.api = api
        self.recheck = recheck
        self.known: dict[tuple[str, str], Known] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        # kopf's indexes of the policies' CronJobs and Jobs (main.py), once a handler was given them
        self.cronjobs: Mapping[tuple[str, str], Collection[str]] | None = None
        self.jobs: Mapping[tuple[str, str], Iterable[dict[str, Any]]] | None = None

    def watching(
        self,
        cronjobs: Mapping[tuple[str, str], Collection[str]],
        jobs: Mapping[tuple[str, str], Iterable[dict[str, Any]]],
    ) -> None:
        """Passes read whether the policies' CronJobs exist, and their Jobs, from these indexes (``Watched``)."""
        self.cronjobs, self.jobs = cronjobs, jobs

    def _watched(self, key: tuple[str, str], api: kube.Api, began: float) -> Watched:
        if self.cronjobs is None or self.jobs is None:
            return Watched(api, key, began=began)
        cronjob = bool(self.cronjobs.get(key))
        jobs = list(self.jobs.get(key) or ())
        return Watched(api, key, began=began, cronjob=cronjob, jobs=jobs, indexed=True)

    async def policy_event(self, type: str | None, body: Mapping[str, Any], grants: GrantsOf) -> None:
        metadata = body["metadata"]
        key = (str(metadata["namespace"]), str(metadata["name"]))
        if type == "DELETED":
            self.forget(key)
            metrics.forget_backup_policy(*key)
            return
        known = self.known.get(key)
        if known is not None:
            known.status, known.grants = reflecting(body.get("status")), grants
        if metadata.get("deletionTimestamp"):
            self._stop_timer(known)
            return
        step = wanted(known, body)
        if step is not None:
            await self.run(key, step, dict(body), grants, unless=lambda now: wanted(now, body) is None)

    async def cronjob_event(self, type: str | None, body: Mapping[str, Any], grants: GrantsOf) -> None:
        """A CronJob of ours edited or deleted by hand (it no longer has what the last pass applied): a pass."""
        metadata = body["metadata"]
        policy = str((metadata.get("labels") or {}).get(POLICY_LABEL))
        key = (str(metadata["namespace"]), policy)
        known = self.known.get(key)
        if known is None or known.cronjob is None or metadata["name"] != cronjob_name(policy):
            return  # no pass applied it yet (the policy's first pass, or its retry, will)
        live = dict(body)

        def unchanged(now: Known) -> bool:
            return type != "DELETED" and now.cronjob is not None and contains(live, converged_to(now))

        if not unchanged(known):
            await self.run(key, reconcile, None, grants, unless=unchanged)

    async def job_event(self, type: str | None, body: Mapping[str, Any], grants: GrantsOf) -> None:
        """A Job of the policy started or finished and status does not show it yet: a full pass (it records the
        outcome and re-checks the references: a Secret deleted since shows when the Job fails)."""
        metadata = body["metadata"]
        policy = str((metadata.get("labels") or {}).get(POLICY_LABEL))
        owner = cronjob_name(policy)
        owned = any(r.get("kind") == "CronJob" and r.get("name") == owner for r in metadata.get("ownerReferences", []))
        if type == "DELETED" or not owned:
            return
        key = (str(metadata["namespace"]), policy)
        known = self.known.get(key)
        if known is not None and job_reflected(known.status, body):
            return
        if (job_outcome(body) or ("",))[0] == "Failed":
            MANIFEST_KEYS.forget(key[0])  # the run may have failed for want of it
        await self.run(key, reconcile, None, grants, unless=lambda now: job_reflected(now.status, body))

    async def run(
        self,
        key: tuple[str, str],
        step: Step,
        body: dict[str, Any] | None,
        grants: GrantsOf | None,
        *,
        unless: Callable[[Known], bool] | None = None,
    ) -> None:
        """One pass of ``step`` (over ``body``, else the policy as the API server has it now), then the next
        one timed; none when ``unless`` says, once the policy's earlier pass is over, that it is not needed any
        more. Never raises: a failure is retried with backoff."""
        known = self.known.setdefault(key, Known())
        known.grants = grants or known.grants
        async with known.lock:
            if unless is not None and unless(known):
                return
            self._stop_timer(known)
            api = self._watched(key, self.api(), time.monotonic())
            try:
                if body is None:
                    body = await blocking(api.get, POLICY.resource, *key)
                if body is None:
                    self.forget(key)
                    return
                if body["metadata"].get("deletionTimestamp"):
                    return
                if known.uid != body["metadata"]["uid"]:  # first sight, or deleted and created again
                    known.uid, known.generation, known.cronjob, known.failures = body["metadata"]["uid"], None, None, 0
                result, ctx = await blocking(run_step, api, body, step, known.grants, known.failures)
            except Exception as error:  # the API server refused a read or the status write: retry
                result = Result(requeue_after=backoff(UNEXPECTED_RETRY, known.failures + 1), error=as_failure(error))
                LOG.warning("BackupPolicy %s/%s: %s; retrying in %.0f s", *key, result.error, result.requeue_after)
                known.failures += 1
                self._time(key, known, result)
                return
            known.failures = known.failures + 1 if result.error is not None else 0
            known.token = ctx.status.backup_now
            known.status = reflecting(ctx.status.model_dump(by_alias=True, exclude_none=True, mode="json"))
            if step is reconcile:
                known.generation = ctx.generation
                converged = api.converged if result.error is None else None
                known.cronjob = compact(converged) if converged is not None else None
            self._time(key, known, result)

    def _time(self, key: tuple[str, str], known: Known, result: Result) -> None:
        if result.finished:
            return
        delay = result.requeue_after
        if result.error is None:  # the re-check, spread so that policies made together do not re-check together
            spread = int(hashlib.sha256("/".join(key).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            recheck = self.recheck * (0.9 + 0.1 * spread)
            delay = recheck if delay is None else min(delay, recheck)
        if delay is None:
            return  # a failure that waits for a change of the policy
        known.timer = asyncio.get_running_loop().call_later(delay, self._timed, key)

    def _timed(self, key: tuple[str, str]) -> None:
        task = asyncio.ensure_future(self.run(key, reconcile, None, None))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _stop_timer(known: Known | None) -> None:
        if known is not None and known.timer is not None:
            known.timer.cancel()
            known.timer = None

    def forget(self, key: tuple[str, str]) -> None:
        self._stop_timer(self.known.pop(key, None))


PASSES = Passes()


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
    deferred: list[str] = []
    finished = sorted(((job, *outcome) for job in jobs if (outcome := job_outcome(job))), key=lambda t: t[2])
    for job, state, when in finished:
        job_name = job["metadata"]["name"]
        seen = [r for r in (success, failure) if r is not None]
        latest = max((t for r in seen if (t := parse_time(r.time))), default=None)
        if job_name in [r.job for r in seen] or (latest is not None and when < latest):
            continue
        if state == "Complete":
            recorded = _record_success(ctx, spec, job, labels, deferred)
            if recorded is not None:
                success = recorded
                continue
            failure = status.last_failure
        else:
            reason, message = failure_reason(job, job_pods(ctx.api, namespace, job_name))
            failure = _record_failure(ctx, job=job_name, when=when, reason=reason, message=message, labels=labels)
    _set_metrics(labels, status)
    return Result.after(VERIFY_LATER) if deferred else Result.done()


def _record_success(
    ctx: PolicyContext, spec: BackupPolicySpec, job: Mapping[str, Any], labels: dict[str, str], deferred: list[str]
) -> BackupRecord | None:
    """Count a Complete Job when its manifest is in the bucket and matches; else record why it does not (or,
    when the bucket cannot be read now, add the Job to ``deferred``)."""
    namespace, name = ctx.namespace, ctx.name
    job_name = job["metadata"]["name"]
    location = spec.destination.s3
    try:
        client = s3_client(ctx.api, namespace, location, field=S3_CREDENTIALS_FIELD)
        created = parse_time(job["metadata"]["creationTimestamp"]) or ctx.now()
        manifest = find_manifest(client, location, namespace=namespace, policy=name, job=job_name, created=created)
        problem = "no manifest.json was written" if manifest is None else verify_manifest(client, location, manifest)
    except (RunbookError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        # The bucket cannot be checked right now: decide on a later pass (``VERIFY_LATER``) instead.
        message = error.message if isinstance(error, RunbookError) else s3_error(error, location).message
        LOG.warning("cannot verify the backup of Job %s yet: %s", job_name, message)
        deferred.append(job_name)
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
