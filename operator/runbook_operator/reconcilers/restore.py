"""BackupRestore: preflight, record, scale down, restore Job, check, scale back up — a step table in status.

``RESTORE`` is the kind's ``Reconciler``. Each pass resumes at the step that status records as running and
walks the table (``STEPS``) until a step waits (``Result.after``) or the restore ends (``Result.stop()``);
status is written when a step begins and ends, so the operator can stop at any point and the next pass
resumes. What differs per source is a ``Target`` (PostgreSQL here, Redis and Kubernetes in their modules):

- **Preflight** (read-only): the operator checks what reads no byte of the backup: the policy, the backup's
  manifest (its signature, its policy, its folder), every referenced Secret, the scaleDown workloads and
  the target login; it pins the manifest in status, then a verify Job (``build_verify_job``) streams the
  whole stored object through the agent's ``verify`` (SHA-256 while streaming, full decryption, the
  contents: ``pg_restore --list`` here) and reports its figures or its reason in its termination message,
  which a later pass reads. No byte of a backup passes through the operator, whatever its size. Any
  failure ends the restore here: nothing was changed. ``dryRun`` ends here too.
- **ScaleDown**: the replica counts are recorded in status, then each workload is scaled to zero with
  the count annotated on it, and the pass waits until they have no pods.
- **Restore**: the Job runs the agent's ``restore`` (one transaction: all or nothing); the pass
  watches the Job and reads a failure's reason from its pod's termination message.
- **Check**: the restored tables' row counts, sequence values and large objects (count and digest) must
  equal those the manifest recorded at backup time.
- **ScaleUp**: always runs once ScaleDown has begun, also after a failure: the workloads get their
  recorded counts back and the pass waits until they are available.

A drill is a BackupRestore that a policy's ``verification`` creates (``drills.py``): when it ends, the
policy's ``lastVerifiedBackup`` and ``Verified`` condition record the outcome.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import botocore.exceptions
import psycopg

from .. import metrics
from ..agent.restore import check_contents, connect_target
from ..builders.restore import (
    DRILL_LABEL,
    REPLICAS_ANNOTATION,
    build_job,
    build_plan,
    build_verify_job,
    is_available,
    is_stopped,
    job_name,
    resolve_target,
    start_patch,
    stop_patch,
    verify_job_name,
)
from ..clients import kube
from ..clients.s3 import get_json
from ..errors import RunbookError, parse_spec
from ..logs import audit
from ..models.backup import (
    RESTORE_ENDED,
    BackupPolicySpec,
    BackupRestoreSpec,
    BackupRestoreStatus,
    PinnedBackup,
    ReplicaRecord,
    RestoreChecks,
    RestorePhase,
    RestoreStep,
    RestoreStepName,
    StepPhase,
)
from ..models.common import parse_time, rfc3339
from ..models.plans import (
    MANIFEST,
    MANIFEST_KEY_SECRET,
    MANIFEST_KEY_SECRET_KEY,
    PG_PASSWORD_ENV,
    PG_USER_ENV,
    SIGNATURE,
    RestorePlan,
    StoredObjectPlan,
    backup_folder,
    manifest_signed,
    policy_folder,
)
from ..models.sources import PostgresConnection
from ..settings import agent_image
from . import runtime, tenancy
from .catalog import S3_CREDENTIALS_FIELD, s3_client, stored_backups
from .jobs import failure_reason, job_outcome, job_pods, job_summary, read_job
from .runtime import Context, Reconciler, Result

if TYPE_CHECKING:
    from .restore_pitr import PointInTimeTarget

RESTORES = kube.custom_resource("backuprestores", "BackupRestore")
POLICIES = kube.custom_resource("backuppolicies", "BackupPolicy")
POLL_SECONDS = 2.0
RESTORE_FAILURE_PREFIX = "restore failed: "
VERIFY_FAILURE_PREFIX = "verify failed: "
ALL_STEPS = tuple(RestoreStepName)

Ctx = Context[BackupRestoreSpec, BackupRestoreStatus]
# A step's end (its message), or how long to wait before it is looked at again.
Outcome = str | Result


class Target(Protocol):
    """What restoring one source kind takes beyond the shared steps. A failure raises ``RunbookError``."""

    source: str  # the backup's kind, as ``runbook-operator verify --source`` names it

    def steps(self, dry_run: bool) -> tuple[RestoreStepName, ...]:
        """The steps of the table this source goes through."""

    def plan(self) -> tuple[StoredObjectPlan, dict[str, Any]]:
        """The agent's plan and the manifest it comes from (the pinned one once the preflight pinned it)."""

    def preflight(self) -> tuple[StoredObjectPlan, dict[str, Any]]:
        """Every check that reads no byte of the backup, changing nothing (sets backupKey, backupTime,
        target); the plan the verify Job reads and its manifest."""

    def verified(self, plan: StoredObjectPlan, figures: Mapping[str, Any]) -> str:
        """The Preflight step's message once the verify Job read the whole backup (``figures``: its summary)."""

    def job(self) -> tuple[dict[str, Any], str]:
        """The restore Job and the Event message."""

    def job_done(self, name: str, pods: list[dict[str, Any]]) -> str:
        """The completed Job's figures into status; the Restore step's message."""

    def job_ended(self) -> None:
        """The Restore step ended, whichever way."""

    def check(self) -> str:
        """The restored contents against the manifest; the Check step's message."""

    def restored(self) -> str:
        """Ready's message once the restore succeeded."""


@dataclass(frozen=True)
class Step:
    """One row of the table: ``cleanup_after``: the step always runs once that step has begun, also after a
    failure; ``ended``: runs whenever the step ends."""

    name: RestoreStepName
    phase: RestorePhase
    run: Callable[[Restore], Outcome]
    cleanup_after: RestoreStepName | None = None
    ended: Callable[[Restore], None] | None = None


class Restore:
    """One pass over one BackupRestore: the shared steps' helpers and its source's ``Target``."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.api = ctx.api
        self.status = ctx.status
        self.namespace = ctx.namespace
        self.name = ctx.name
        self.folder = ""  # the backup's folder, once manifest() read or found it pinned
        self.target: Target | PointInTimeTarget = self._target()

    @functools.cached_property
    def spec(self) -> BackupRestoreSpec:
        """The spec as the tenancy rules allow it over the confined policy (``tenancy.confine_backup_restore``):
        the steps read it before any Secret is read or anything is contacted, so a refusal fails the step."""
        grants = self.ctx.grants(self.namespace)
        return self.ctx.confine(
            tenancy.confine_backup_restore(self.api, grants, self.namespace, self.ctx.spec, self.policy)
        )

    @property
    def raw_spec(self) -> Mapping[str, Any]:
        return self.ctx.body.get("spec") or {}

    # --- what the spec refers to -----------------------------------------------------------------------

    def _target(self) -> Target | PointInTimeTarget:
        """The one dispatch on the policy's source (PostgreSQL when the policy cannot be read: its preflight
        says why), or a point-in-time recovery (``spec.pointInTime``). Imported here: those modules build on
        this one."""
        if self.raw_spec.get("pointInTime") is not None:
            from .restore_pitr import PointInTimeTarget

            return PointInTimeTarget(self)
        try:
            kind = self.parsed_policy.source.kind
        except RunbookError:
            kind = "postgresql"
        if kind == "kubernetes":
            from .restore_kubernetes import KubernetesTarget

            return KubernetesTarget(self)
        if kind == "redis":
            from .restore_redis import RedisTarget

            return RedisTarget(self)
        return PostgresTarget(self)

    @functools.cached_property
    def parsed_policy(self) -> BackupPolicySpec:
        """The referenced BackupPolicy's spec as written, or why there is none."""
        ref = str(self.raw_spec.get("policyRef") or "")
        body = self.api.get(POLICIES, self.namespace, ref)
        if body is None:
            raise RunbookError("PolicyNotFound", f"spec.policyRef: BackupPolicy {ref} not found")
        try:
            return parse_spec(BackupPolicySpec, body.get("spec"))
        except RunbookError as error:
            raise RunbookError("PolicyInvalid", f"spec.policyRef: BackupPolicy {ref}: {error.message}") from None

    @functools.cached_property
    def policy(self) -> BackupPolicySpec:
        """The referenced BackupPolicy's spec as the tenancy rules allow it (``tenancy.confine_backup_policy``)."""
        policy = self.parsed_policy
        try:
            return tenancy.confine_backup_policy(self.api, self.ctx.grants(self.namespace), self.namespace, policy)
        except RunbookError as error:
            ref = self.raw_spec.get("policyRef")
            message = f"spec.policyRef: BackupPolicy {ref}: {error.message}"
            raise RunbookError(error.reason, message, retry_after=error.retry_after) from None

    def decryptable(self) -> None:
        if self.policy.encryption.gpg.passphrase_secret_ref is None and self.spec.decryption_secret_ref is None:
            raise RunbookError(
                "DecryptionKeyMissing",
                f"spec.decryptionSecretRef: BackupPolicy {self.spec.policy_ref} encrypts to public keys; name the "
                "Secret key holding the private key",
            )

    def secret(self, name: str, key: str, *, field: str, redact: bool = True) -> str:
        """A Secret value, registered with the redactor unless ``redact`` is False (a user name such as
        ``postgres`` would scrub the word from every later log line and message)."""
        return kube.secret_value(self.api, self.namespace, name, key, field=field, redact=redact)

    def storage_secrets(self) -> None:
        """The S3 keys and the decryption key the verify and restore Jobs get (as Secret references), read here
        so that a missing Secret or key fails the preflight naming its field, before any Job."""
        spec, policy = self.spec, self.policy
        s3 = policy.destination.s3.credentials_secret_ref
        if s3 is not None:
            field = f"BackupPolicy {spec.policy_ref} spec.destination.s3.credentialsSecretRef"
            self.secret(s3.name, s3.access_key_id_key, field=field)
            self.secret(s3.name, s3.secret_access_key_key, field=field)
        passphrase = policy.encryption.gpg.passphrase_secret_ref
        if passphrase is not None:
            field = f"BackupPolicy {spec.policy_ref} spec.encryption.gpg.passphraseSecretRef"
            self.secret(passphrase.name, passphrase.key, field=field)
        if spec.decryption_secret_ref is not None:
            ref = spec.decryption_secret_ref
            self.secret(ref.name, ref.key, field="spec.decryptionSecretRef")

    def manifest(self) -> dict[str, Any]:
        """The manifest of the backup to restore: the one the preflight pinned (never read again), else read
        as ``spec.backup`` says; it must describe a backup of the policy's source kind and be ``authentic``."""
        pinned = self.status.pinned
        if pinned is not None:
            self.folder = pinned.folder
            stored: dict[str, Any] = json.loads(pinned.manifest)
            return stored
        spec, policy = self.spec, self.policy
        location = policy.destination.s3
        client = s3_client(self.api, self.namespace, location, field=S3_CREDENTIALS_FIELD)
        base = policy_folder(location, self.namespace, spec.policy_ref)
        chosen = self.status.backup_key or spec.backup
        try:
            if chosen == "latest":
                complete = [b for b in stored_backups(client, location, self.namespace, spec.policy_ref) if b.complete]
                if not complete:
                    raise RunbookError(
                        "BackupNotFound", f"spec.backup: BackupPolicy {spec.policy_ref} has no complete backup"
                    )
                folder = complete[-1].folder
            else:
                named = backup_folder(base, chosen)
                if named is None:
                    raise RunbookError(
                        "BackupNotFound",
                        f"spec.backup: {chosen!r} is neither 'latest', a backup's timestamp nor a key under {base}",
                    )
                folder = named
            try:
                manifest = get_json(client, location, folder + MANIFEST)
            except botocore.exceptions.ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise RunbookError(
                        "BackupNotFound",
                        f"spec.backup: no manifest at {folder}{MANIFEST}: the backup is missing or incomplete",
                    ) from None
                raise
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            raise RunbookError("S3Unreachable", f"bucket {location.bucket}: {type(error).__name__}") from None
        kind = policy.source.kind
        if (manifest.get("source") or {}).get("kind") != kind or not (manifest.get("data") or {}).get("sha256"):
            raise RunbookError("ManifestInvalid", f"{folder}{MANIFEST} does not describe a {kind} backup")
        self.authentic(folder, manifest)
        self.folder = folder
        return manifest

    @property
    def drill(self) -> bool:
        return bool((self.ctx.body["metadata"].get("labels") or {}).get(DRILL_LABEL))

    @functools.cached_property
    def manifest_key(self) -> str:
        """The namespace's manifest signing key (the BackupPolicy reconcile creates it)."""
        field = f"Secret {MANIFEST_KEY_SECRET} (the namespace's manifest signing key)"
        return self.secret(MANIFEST_KEY_SECRET, MANIFEST_KEY_SECRET_KEY, field=field)

    def authentic(self, folder: str, manifest: Mapping[str, Any]) -> None:
        """Refused before anything is touched: a manifest without a signature (unless
        ``spec.allowUnsignedBackup``, never in a drill), one whose signature the namespace's key does not
        verify, one written for another policy, or one whose data object is not in the manifest's folder."""
        where = f"{folder}{MANIFEST}"
        if not manifest.get(SIGNATURE):
            if self.drill:
                raise RunbookError(
                    "ManifestUnsigned", f"{where} is not signed: a drill never restores an unsigned backup"
                )
            if not self.spec.allow_unsigned_backup:
                raise RunbookError(
                    "ManifestUnsigned",
                    f"{where} is not signed; a backup made before manifests were signed is restored only with "
                    "spec.allowUnsignedBackup: true",
                )
            message = f"spec.allowUnsignedBackup: {where} is not signed; restoring it without proof of who wrote it"
            self.ctx.condition("ManifestVerified", "False", "UnsignedBackupAllowed", message)
            self.ctx.event("Warning", "UnsignedBackupAllowed", message)
        elif not manifest_signed(manifest, self.manifest_key):
            raise RunbookError(
                "ManifestForged",
                f"{where}: its signature does not verify with Secret {MANIFEST_KEY_SECRET}: not written by this "
                "namespace's backups, or changed since",
            )
        recorded = manifest.get("policy") or {}
        if (recorded.get("namespace"), recorded.get("name")) != (self.namespace, self.spec.policy_ref):
            raise RunbookError(
                "ManifestForged",
                f"{where} was written for BackupPolicy {recorded.get('namespace')}/{recorded.get('name')}, not "
                f"{self.namespace}/{self.spec.policy_ref}",
            )
        data_key = str((manifest.get("data") or {}).get("key") or "")
        name = data_key.removeprefix(folder)
        if name == data_key or not name or "/" in name:
            raise RunbookError("ManifestForged", f"{where}: its data object {data_key} is not in the folder {folder}")
        if manifest.get(SIGNATURE):
            self.ctx.condition(
                "ManifestVerified", "True", "Signed", f"{where}: signed with Secret {MANIFEST_KEY_SECRET}"
            )

    @property
    def etag(self) -> str | None:
        """The data object's ETag the preflight pinned (None until then)."""
        return self.status.pinned.etag if self.status.pinned is not None else None

    def pin(self, manifest: Mapping[str, Any], figures: Mapping[str, Any]) -> None:
        """What the preflight checked, kept for the Jobs and the checks: the manifest as read (before the verify
        Job reads its object) and the ETag of the object the verify Job read (``figures``)."""
        etag = str(figures.get("etag") or "") or None
        self.status.pinned = PinnedBackup(folder=self.folder, manifest=json.dumps(manifest), etag=etag)

    def chosen(self, key: str, manifest: Mapping[str, Any], target: str) -> None:
        self.status.backup_key = key
        self.status.backup_time = manifest.get("endTime")
        self.status.target = target

    def add_checks(self, figures: Mapping[str, Any]) -> None:
        current = self.status.checks.to_api() if self.status.checks is not None else {}
        self.status.checks = RestoreChecks.model_validate({**current, **figures})

    def audit(self, event: str, **fields: Any) -> None:
        audit(
            event,
            namespace=self.namespace,
            name=self.name,
            kind=RESTORES.kind,
            policy=self.raw_spec.get("policyRef"),
            backup=self.status.backup_key,
            target=self.status.target,
            **fields,
        )

    # --- workloads -------------------------------------------------------------------------------------

    def workload(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.api.get(kube.workload(kind), self.namespace, name)

    def set_workload(self, record: ReplicaRecord, patch: Mapping[str, Any]) -> None:
        """A stop/start patch: the annotation as a merge patch, the replicas through ``/scale`` (stopping
        records the count first, starting removes the record last)."""
        resource = kube.workload(record.kind)
        replicas = {"spec": {"replicas": patch["spec"]["replicas"]}}
        metadata = {"metadata": patch["metadata"]}
        if patch["spec"]["replicas"] == 0:
            self.api.patch(resource, self.namespace, record.name, metadata)
            self.api.patch(resource, self.namespace, record.name, replicas, subresource="scale")
        else:
            self.api.patch(resource, self.namespace, record.name, replicas, subresource="scale")
            self.api.patch(resource, self.namespace, record.name, metadata)

    def workload_refs(self) -> list[tuple[str, str, str]]:
        """(kind, name, field) of each workload stopped during the restore: ``spec.scaleDown``, and an InPlace
        point-in-time restore's StatefulSet (``spec.pointInTime.statefulSet``) when not listed there."""
        spec = self.spec
        refs: list[tuple[str, str, str]] = [
            (ref.kind, ref.name, f"spec.scaleDown[{index}]") for index, ref in enumerate(spec.scale_down)
        ]
        point = spec.point_in_time
        if (
            point is not None
            and point.mode == "InPlace"
            and ("StatefulSet", point.stateful_set) not in {(kind, name) for kind, name, _ in refs}
        ):
            refs.append(("StatefulSet", point.stateful_set, "spec.pointInTime.statefulSet"))
        return refs

    def workloads_found(self) -> None:
        for kind, name, field in self.workload_refs():
            if self.workload(kind, name) is None:
                raise RunbookError("WorkloadNotFound", f"{field}: {kind} {name} not found")

    def counts(self) -> str:
        return ", ".join(f"{r.name}={r.replicas}" for r in self.status.scaled_down or []) or "none"

    # --- the timeline ----------------------------------------------------------------------------------

    def now(self) -> str:
        return rfc3339(self.ctx.now())

    def running(self) -> RestoreStep | None:
        running = [s for s in self.status.steps if s.phase == StepPhase.RUNNING]
        return running[-1] if running else None

    def running_for(self) -> float:
        """Seconds since the running step began."""
        step = self.running()
        started = parse_time(step.start_time if step is not None else None)
        return 0.0 if started is None else (self.ctx.now() - started).total_seconds()

    def begin(self, step: Step) -> None:
        self.status.steps = [
            *self.status.steps,
            RestoreStep(name=step.name, phase=StepPhase.RUNNING, start_time=self.now()),
        ]
        self.status.phase = step.phase

    def end(self, phase: StepPhase, message: str) -> None:
        step = self.running()
        assert step is not None
        step.phase, step.end_time, step.message = phase, self.now(), message[:1024]
        self.status.steps = list(self.status.steps)  # marks the list as changed for the status writer

    def failed(self) -> bool:
        return any(s.phase == StepPhase.FAILED for s in self.status.steps)

    def table(self) -> list[Step]:
        chosen = self.target.steps(bool(self.raw_spec.get("dryRun")))
        return [BY_NAME[name] for name in chosen]  # in the target's order

    def next_step(self) -> Step | None:
        """After a failure: a clean-up step whose step has begun and that has not run yet; otherwise the step
        after the last one recorded; None when the restore has ended."""
        begun = {s.name for s in self.status.steps}
        table = self.table()
        if self.failed():
            return next((s for s in table if s.cleanup_after in begun and s.name not in begun), None)
        return next((s for s in table if s.name not in begun), None)

    # --- the one loop ----------------------------------------------------------------------------------

    def advance(self) -> Result:
        """Run the recorded step, then the next ones, until one waits or the restore has ended."""
        if self.status.phase in RESTORE_ENDED:
            return Result.stop()
        if not self.status.steps:
            self.start()
        while True:
            record = self.running()
            if record is None:
                upcoming = self.next_step()
                if upcoming is None:
                    self.finish(self.outcome())
                    return Result.stop()
                self.begin(upcoming)
                self.ctx.checkpoint()
                continue
            step = BY_NAME[record.name]
            try:
                outcome = step.run(self)
            except RunbookError as error:
                self.end(StepPhase.FAILED, f"{error.reason}: {error.message}")
                if step.ended is not None:
                    step.ended(self)
                self.step_failed(step, error)
                continue
            if isinstance(outcome, Result):
                return outcome
            self.end(StepPhase.SUCCEEDED, outcome)
            if step.ended is not None:
                step.ended(self)

    def start(self) -> None:
        self.status.start_time = self.now()
        self.begin(STEPS[0])
        self.ctx.condition("Ready", "False", "Preflight", "verifying the backup before changing anything")
        self.ctx.checkpoint()
        metrics.RESTORES.labels(self.namespace, RestorePhase.FAILED)  # the series exists at 0 before a failure
        spec = self.raw_spec
        point = spec.get("pointInTime") or {}
        what = (
            f"recovering to {point.get('targetTime') or point.get('targetLSN') or 'latest'} from the WAL archive"
            if point
            else f"restoring {spec.get('backup', 'latest')}"
        )
        self.ctx.event("Normal", "RestoreStarted", f"{what} of BackupPolicy {spec.get('policyRef')}")
        self.audit("restore_started", dryRun=bool(spec.get("dryRun")), scaleDown=spec.get("scaleDown") or [])

    def step_failed(self, step: Step, error: RunbookError) -> None:
        """Ready says why, with a Warning Event; a clean-up step's failure does not hide the failure that led
        to it (nor repeats it as an Event: the restore's end says it)."""
        if step.cleanup_after is not None:
            if not any(s.phase == StepPhase.FAILED for s in self.status.steps if s.name != step.name):
                self.ctx.condition("Ready", "False", error.reason, error.message)
            return
        self.ctx.condition("Ready", "False", error.reason, error.message)
        self.ctx.event("Warning", error.reason, error.message)

    def outcome(self) -> RestorePhase:
        if self.failed():
            return RestorePhase.FAILED
        return RestorePhase.DRY_RUN_SUCCEEDED if self.raw_spec.get("dryRun") else RestorePhase.SUCCEEDED

    def finish(self, phase: RestorePhase) -> None:
        self.status.phase = phase
        self.status.completion_time = self.now()
        if phase == RestorePhase.DRY_RUN_SUCCEEDED:
            self.ctx.condition(
                "Ready", "True", "DryRunSucceeded", "the backup is intact and restorable; nothing was changed"
            )
        elif phase == RestorePhase.SUCCEEDED:
            self.ctx.condition("Ready", "True", "Restored", self.target.restored())
        self.ctx.checkpoint()
        ready = next(c for c in self.status.conditions if c.type == "Ready")
        failed = phase == RestorePhase.FAILED
        self.ctx.event("Warning" if failed else "Normal", f"Restore{phase}", ready.message or "")
        started = parse_time(self.status.start_time)
        duration = 0.0 if started is None else (self.ctx.now() - started).total_seconds()
        checks = self.status.checks
        self.audit(
            "restore_completed",
            outcome=str(phase),
            reason=ready.reason,
            durationSeconds=round(duration, 1),
            rows=checks.rows if checks is not None else None,
        )
        metrics.RESTORES.labels(self.namespace, phase).inc()
        metrics.RESTORE_DURATION.labels(self.namespace, phase).observe(duration)
        drill_of = (self.ctx.body["metadata"].get("labels") or {}).get(DRILL_LABEL)
        if drill_of:
            from .drills import record_drill

            record_drill(self.api, self.namespace, drill_of, restore=self.name, status=self.status, ready=ready)


# --- the shared steps -------------------------------------------------------------------------------------


def preflight(restore: Restore) -> Outcome:
    """The target's checks, which read no byte of the backup, and the manifest pinned; then the verify Job reads
    the whole object, and a later pass ends the step with its outcome (nothing waits here)."""
    from .restore_pitr import PointInTimeTarget  # it builds on this module

    target = restore.target
    if isinstance(target, PointInTimeTarget):  # no verify Job: the restore Job verifies every object first
        return target.preflight_in_operator()
    api, namespace, name = restore.api, restore.namespace, verify_job_name(restore.name)
    job = read_job(api, namespace, name)
    if job is not None and not owned_by(job, restore.ctx.body):
        return Result.after(POLL_SECONDS)  # an earlier BackupRestore of this name's Job, being collected
    if job is None:
        if restore.status.pinned is None:
            plan, manifest = target.preflight()
            restore.pin(manifest, {})
            restore.ctx.checkpoint()  # the Job reads this manifest's object; no later pass reads another
        else:  # pinned in an earlier pass (the Job was not created then, or was deleted since): the same plan
            plan, _ = target.plan()
        body = build_verify_job(
            restore.ctx.body,
            plan,
            source=target.source,
            policy=restore.policy,
            spec=restore.spec,
            image=agent_image(),
        )
        api.create(kube.JOBS, namespace, body)
        restore.ctx.event(
            "Normal",
            "VerifyJobCreated",
            f"Job {name} reads {plan.key} ({plan.size_bytes} bytes): SHA-256 against the manifest, decryption, "
            "contents",
        )
        return Result.after(POLL_SECONDS)
    outcome = job_outcome(job)
    if outcome is None:
        return Result.after(POLL_SECONDS)
    pods = [pod for pod in job_pods(api, namespace, name) if owned_by(pod, job)]
    if outcome[0] != "Complete":
        raise RunbookError(*failure_reason(job, pods, prefix=VERIFY_FAILURE_PREFIX))
    plan, manifest = target.plan()
    figures = job_summary(pods, target.source)
    if figures is None or (figures.get("sha256"), figures.get("sizeBytes")) != (plan.sha256, plan.size_bytes):
        raise RunbookError("SummaryMissing", f"Job {name} completed without its summary of {plan.key}")
    restore.pin(manifest, figures)
    restore.add_checks(figures)
    message = target.verified(plan, figures)
    restore.ctx.event("Normal", "PreflightPassed", message)
    return message


def owned_by(child: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    """Whether ``child`` belongs to ``owner`` (by uid: not an object of the same name made before or by others)."""
    uid = owner["metadata"].get("uid")
    return any(ref.get("uid") == uid for ref in child["metadata"].get("ownerReferences") or [])


def scale_down(restore: Restore) -> Outcome:
    spec, status = restore.spec, restore.status
    if status.scaled_down is None:
        records = []
        for kind, workload_name, field in restore.workload_refs():
            workload = restore.workload(kind, workload_name)
            if workload is None:
                raise RunbookError("WorkloadNotFound", f"{field}: {kind} {workload_name} not found")
            replicas = int((workload.get("spec") or {}).get("replicas", 1))
            records.append(ReplicaRecord(kind=kind, name=workload_name, replicas=replicas))
        status.scaled_down = records
        restore.ctx.checkpoint()  # recorded before anything is scaled
        if records:
            counts = ", ".join(f"{r.kind} {r.name}={r.replicas}" for r in records)
            restore.ctx.event("Normal", "ReplicasRecorded", f"recorded {counts}; scaling to 0")
    stopped = True
    uid = str(restore.ctx.body["metadata"]["uid"])
    for record in status.scaled_down:
        workload = restore.workload(record.kind, record.name)
        if workload is None:
            continue
        annotations = workload["metadata"].get("annotations") or {}
        if (workload.get("spec") or {}).get("replicas") != 0 or REPLICAS_ANNOTATION not in annotations:
            restore.set_workload(record, stop_patch(uid, record.replicas))
            stopped = False
        else:
            stopped = stopped and is_stopped(workload)
    if stopped:
        return f"stopped: {', '.join(r.name for r in status.scaled_down) or 'none'}"
    if restore.running_for() > spec.scale_timeout_seconds:
        raise RunbookError("ScaleDownTimeout", f"workloads still had pods after {spec.scale_timeout_seconds}s")
    return Result.after(POLL_SECONDS)


def run_job(restore: Restore) -> Outcome:
    api, namespace, name = restore.api, restore.namespace, job_name(restore.name)
    job = read_job(api, namespace, name)
    if job is None:
        if restore.status.job_name:
            raise RunbookError("JobMissing", f"Job {name} was deleted before it finished")
        body, message = restore.target.job()
        api.create(kube.JOBS, namespace, body)
        restore.status.job_name = body["metadata"]["name"]
        restore.ctx.checkpoint()
        restore.ctx.event("Normal", "RestoreJobCreated", message)
        return Result.after(POLL_SECONDS)
    restore.status.job_name = name  # also when a crash came between creating it and recording it
    outcome = job_outcome(job)
    if outcome is None:
        return Result.after(POLL_SECONDS)
    pods = job_pods(api, namespace, name)
    if outcome[0] != "Complete":
        reason, message = failure_reason(job, pods, prefix=RESTORE_FAILURE_PREFIX)
        raise RunbookError(reason, f"Job {name}: {message}")
    return restore.target.job_done(name, pods)


def check(restore: Restore) -> Outcome:
    return restore.target.check()


def scale_up(restore: Restore) -> Outcome:
    spec = restore.ctx.spec  # as written: bringing the workloads back needs no tenancy check
    waiting: list[str] = []
    for record in restore.status.scaled_down or []:
        workload = restore.workload(record.kind, record.name)
        if workload is None:
            continue  # deleted meanwhile: nothing to bring back
        annotations = workload["metadata"].get("annotations") or {}
        if (workload.get("spec") or {}).get("replicas") != record.replicas or REPLICAS_ANNOTATION in annotations:
            restore.set_workload(record, start_patch(record.replicas))
            waiting.append(record.name)
        elif not is_available(workload, record.replicas):
            waiting.append(record.name)
    if not waiting:
        return f"back at the recorded counts and available: {restore.counts()}"
    if restore.running_for() > spec.scale_timeout_seconds:
        late = ", ".join(waiting)
        raise RunbookError(
            "WorkloadsNotAvailable",
            f"replicas set back ({restore.counts()}) but not available after {spec.scale_timeout_seconds}s: {late}",
        )
    return Result.after(POLL_SECONDS)


STEPS = (
    Step(RestoreStepName.PREFLIGHT, RestorePhase.PREFLIGHT, preflight),
    Step(RestoreStepName.SCALE_DOWN, RestorePhase.SCALING_DOWN, scale_down),
    Step(RestoreStepName.RESTORE, RestorePhase.RESTORING, run_job, ended=lambda r: r.target.job_ended()),
    Step(RestoreStepName.CHECK, RestorePhase.CHECKING, check),
    Step(RestoreStepName.SCALE_UP, RestorePhase.SCALING_UP, scale_up, cleanup_after=RestoreStepName.SCALE_DOWN),
)
BY_NAME = {step.name: step for step in STEPS}


# --- PostgreSQL -------------------------------------------------------------------------------------------


class PostgresTarget:
    """A PostgreSQL backup, restored into a database (spec.target over the policy's source)."""

    source = "postgresql"

    def __init__(self, restore: Restore) -> None:
        self.restore = restore

    def steps(self, dry_run: bool) -> tuple[RestoreStepName, ...]:
        return (RestoreStepName.PREFLIGHT,) if dry_run else ALL_STEPS

    def connection(self) -> PostgresConnection:
        restore = self.restore
        spec, policy = restore.spec, restore.policy
        source = policy.source.postgresql
        if source is None:
            raise RunbookError(
                "NotRestorable",
                f"spec.policyRef: BackupPolicy {spec.policy_ref} backs up {policy.source.kind}; only PostgreSQL "
                "backups are restored by a BackupRestore",
            )
        restore.decryptable()
        if spec.target is not None and spec.target.redis is not None:
            raise RunbookError(
                "TargetMismatch",
                f"spec.target.redis: BackupPolicy {spec.policy_ref} backs up PostgreSQL; a PostgreSQL backup is "
                "restored into a database (spec.target host, port, database), not a Redis",
            )
        target = resolve_target(spec, source)
        # the target inherits the source's TLS settings and opt-out: the message names where they are set
        opt_out = f"BackupPolicy {spec.policy_ref} spec.source.postgresql"
        restore.ctx.plaintext(tenancy.plaintext_in_use((opt_out, target)))
        return target

    def ca(self, target: PostgresConnection) -> str | None:
        """The PEM text of the target's ``tls.caSecretRef`` (the policy's source's: a target inherits it), which
        the Job's pod gets as a file; None without TLS."""
        if target.tls is None:
            return None
        ref, policy = target.tls.ca_secret_ref, self.restore.spec.policy_ref
        field = f"BackupPolicy {policy} spec.source.postgresql.tls.caSecretRef"
        return kube.secret_value(self.restore.api, self.restore.namespace, ref.name, ref.key, field=field, redact=False)

    def credentials(self, target: PostgresConnection) -> dict[str, str]:
        """The target's login as the restore Job's pod gets it, read from the same Secret."""
        login, field = target.credentials_secret_ref, "spec.target.credentialsSecretRef"
        return {
            PG_USER_ENV: self.restore.secret(login.name, login.username_key, field=field, redact=False),
            PG_PASSWORD_ENV: self.restore.secret(login.name, login.password_key, field=field),
        }

    def plan(self) -> tuple[RestorePlan, dict[str, Any]]:
        target = self.connection()
        restore = self.restore
        manifest = restore.manifest()
        plan = build_plan(restore.policy, manifest, target, roles=restore.spec.roles, etag=restore.etag)
        return plan, manifest

    def preflight(self) -> tuple[RestorePlan, dict[str, Any]]:
        restore = self.restore
        target = self.connection()
        env = self.credentials(target)
        restore.storage_secrets()
        plan, manifest = self.plan()
        restore.chosen(plan.key, manifest, f"{plan.target.host}:{plan.target.port}/{plan.target.database}")
        restore.workloads_found()
        with connect_target(plan.target, env, self.ca(plan.target)) as conn:
            if restore.drill:
                self.not_the_source(plan.target, conn)
        return plan, manifest

    def verified(self, plan: StoredObjectPlan, figures: Mapping[str, Any]) -> str:
        return (
            f"{plan.key}: SHA-256 matches the manifest ({plan.size_bytes} bytes), decrypts, "
            f"pg_restore lists {figures.get('archiveEntries')} entries; target {self.restore.status.target} reachable"
        )

    def not_the_source(self, target: PostgresConnection, conn: psycopg.Connection[Any]) -> None:
        """A drill's target, proven not to be the policy's source by where both resolve and what both servers
        are (``drills.refuse_source``), before anything is restored."""
        from .drills import Endpoint, postgres_identity, refuse_source, resolved

        restore = self.restore
        source = restore.policy.source.postgresql
        assert source is not None  # connection() checked it
        login = source.credentials_secret_ref
        field = f"BackupPolicy {restore.spec.policy_ref} spec.source.postgresql.credentialsSecretRef"
        login_env = {
            PG_USER_ENV: restore.secret(login.name, login.username_key, field=field, redact=False),
            PG_PASSWORD_ENV: restore.secret(login.name, login.password_key, field=field),
        }
        with connect_target(source, login_env, self.ca(source)) as source_conn:
            source_identity = postgres_identity(source_conn)

        def endpoint(at: PostgresConnection, identity: tuple[str, ...]) -> Endpoint:
            return Endpoint(f"{at.host}:{at.port}/{at.database}", resolved(at.host, at.port), at.database, identity)

        refuse_source(
            restore.spec.policy_ref,
            target=endpoint(target, postgres_identity(conn)),
            source=endpoint(source, source_identity),
        )

    def job(self) -> tuple[dict[str, Any], str]:
        restore = self.restore
        plan, _ = self.plan()
        job = build_job(
            restore.ctx.body, plan, policy=restore.policy, spec=restore.spec, target=plan.target, image=agent_image()
        )
        return job, f"Job {job['metadata']['name']} restores {plan.key} into {restore.status.target}"

    def job_done(self, name: str, pods: list[dict[str, Any]]) -> str:
        return f"Job {name} restored {self.restore.status.backup_key} in one transaction"

    def job_ended(self) -> None:
        pass

    def check(self) -> str:
        target = self.connection()
        env = self.credentials(target)
        plan, manifest = self.plan()
        figures = check_contents(plan.target, env, manifest.get("source") or {}, self.ca(plan.target))
        self.restore.add_checks(figures)
        found = f"{figures['tables']} tables, {figures['rows']} rows, {figures['sequences']} sequences"
        if figures["largeObjects"] is not None:
            found += f", {figures['largeObjects']} large objects"
        return f"{found}: as the manifest recorded at backup time"

    def restored(self) -> str:
        status = self.restore.status
        checks = status.checks or RestoreChecks()
        return (
            f"restored {status.backup_key} into {status.target}: {checks.tables} tables, {checks.rows} rows as "
            "recorded; workloads back at their recorded counts"
        )


# --- the kind ---------------------------------------------------------------------------------------------


def reconcile(ctx: Ctx) -> Result:
    return Restore(ctx).advance()


def finalize(ctx: Ctx) -> Result:
    """Deleted before it finished: the Job goes (its transaction rolls back) and the workloads get their
    recorded counts back at once; the application is never left down by a deletion either."""
    status = ctx.status
    if status.phase in RESTORE_ENDED or not status.scaled_down:
        return Result.done()
    restore = Restore(ctx)
    ctx.api.delete(kube.JOBS, ctx.namespace, job_name(ctx.name))
    for record in status.scaled_down:
        workload = restore.workload(record.kind, record.name)
        annotations = (workload or {}).get("metadata", {}).get("annotations") or {}
        if workload is not None and (
            (workload.get("spec") or {}).get("replicas") != record.replicas or REPLICAS_ANNOTATION in annotations
        ):
            restore.set_workload(record, start_patch(record.replicas))
    counts = ", ".join(f"{r.name}={r.replicas}" for r in status.scaled_down)
    ctx.event(
        "Warning", "RestoreAborted", f"deleted during {status.phase}: Job removed, workloads set back to {counts}"
    )
    restore.audit("restore_completed", outcome="Aborted", reason="Deleted", phase=status.phase)
    metrics.RESTORES.labels(ctx.namespace, "Aborted").inc()
    return Result.done()


RESTORE = Reconciler(RESTORES, BackupRestoreSpec, BackupRestoreStatus, reconcile, finalize)
CLOCKS = runtime.Clocks()
