"""BackupRestore: preflight, record, scale down, restore Job, check, scale back up — a state machine in status.

Each pass reads the object and performs the next step of its ``phase``, writing status before acting, so
the operator can stop at any point and the next pass resumes:

- **Preflight** (in the operator, read-only): the policy, the backup and its manifest, every referenced
  Secret, the scaleDown workloads and the target login are checked, and the whole stored object is
  streamed through the agent's ``verify`` (SHA-256 while streaming, full decryption, ``pg_restore
  --list``). Any failure ends the restore here: nothing was changed. ``dryRun`` ends here too.
- **ScalingDown**: the replica counts are recorded in status, then each workload is scaled to zero with
  the count annotated on it, and the pass waits until they have no pods.
- **Restoring**: the Job runs the agent's ``restore`` (one transaction: all or nothing); the pass
  watches the Job and reads a failure's reason from its pod's termination message.
- **Checking**: the restored tables' row counts, sequence values and large objects (count and digest) must
  equal those the manifest recorded at backup time.
- **ScalingUp**: always reached once anything was scaled down, also after a failure: the workloads
  get their recorded counts back and the pass waits until they are available.

A drill is a BackupRestore that a policy's ``verification`` creates (labelled with the policy): when it
ends, the policy's ``lastVerifiedBackup`` and ``Verified`` condition record the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import os
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import botocore.exceptions
import kopf
from croniter import croniter
from kubernetes.client import ApiException

from .. import metrics
from ..agent.restore import check_contents, connect_target, verify
from ..builders.restore import (
    DRILL_HISTORY,
    DRILL_LABEL,
    REPLICAS_ANNOTATION,
    build_drill,
    build_job,
    build_plan,
    end_step,
    is_available,
    is_stopped,
    job_name,
    resolve_target,
    start_patch,
    start_step,
    step_started,
    stop_patch,
)
from ..clients import kube
from ..clients.s3 import get_json
from ..conditions import now_rfc3339
from ..errors import RunbookError
from ..logs import audit
from ..models import GROUP, VERSION
from ..models.backup import BackupPolicySpec, BackupRestoreSpec
from ..models.plans import (
    GPG_PASSPHRASE_ENV,
    GPG_PRIVATE_KEY_ENV,
    MANIFEST,
    PG_PASSWORD_ENV,
    PG_USER_ENV,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
    RestorePlan,
    backup_folder,
    policy_folder,
)
from ..models.sources import PostgresConnection
from ..settings import FIELD_MANAGER
from .base import StatusPatch, as_failure, backoff, parse_spec, report_failure
from .catalog import S3_CREDENTIALS_FIELD, s3_client, stored_backups
from .jobs import failure_reason, job_outcome, job_pods, read_job

LOG = logging.getLogger(__name__)
KIND = "BackupRestore"
PLURAL = "backuprestores"
POLICIES = "backuppolicies"
PREFLIGHT, SCALING_DOWN, RESTORING, CHECKING, SCALING_UP = (
    "Preflight",
    "ScalingDown",
    "Restoring",
    "Checking",
    "ScalingUp",
)
SUCCEEDED, FAILED, DRY_RUN = "Succeeded", "Failed", "DryRunSucceeded"
TERMINAL = (SUCCEEDED, FAILED, DRY_RUN)
POLL_SECONDS = 2.0
RESTORE_FAILURE_PREFIX = "restore failed: "
# What the operator passes on to pg_restore --list besides the credentials it read.
_TOOL_ENV = ("PATH", "LANG", "LC_ALL", "TMPDIR")


@dataclass(frozen=True)
class Context:
    """The restore's spec and what it refers to."""

    spec: BackupRestoreSpec
    policy: BackupPolicySpec
    target: PostgresConnection


def _seconds_since(rfc3339: str | None) -> float:
    if not rfc3339:
        return 0.0
    return (datetime.now(UTC) - datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))).total_seconds()


class Restore:
    """One pass over one BackupRestore."""

    def __init__(self, body: dict[str, Any], *, image: str) -> None:
        self.body = body
        self.kopf_body = kopf.Body(cast(kopf.RawBody, body))
        self.namespace: str = body["metadata"]["namespace"]
        self.name: str = body["metadata"]["name"]
        self.uid: str = body["metadata"]["uid"]
        self.image = image
        self.status = StatusPatch(body.get("status"), body["metadata"].get("generation"))

    # --- status, Events, audit -------------------------------------------------------------------------

    def flush(self) -> None:
        self.status.write(plural=PLURAL, namespace=self.namespace, name=self.name)

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        (kopf.warn if warning else kopf.info)(self.kopf_body, reason=reason, message=message)

    def audit(self, event: str, **fields: Any) -> None:
        audit(
            event,
            namespace=self.namespace,
            name=self.name,
            kind=KIND,
            policy=(self.body.get("spec") or {}).get("policyRef"),
            backup=self.status.get("backupKey"),
            target=self.status.get("target"),
            **fields,
        )

    def begin(self, step: str, phase: str) -> None:
        self.status.set(phase=phase, steps=start_step(self.status.get("steps", []), step, now_rfc3339()))

    def end(self, step: str, outcome: str, message: str) -> None:
        self.status.set(steps=end_step(self.status.get("steps", []), step, outcome, message, now_rfc3339()))

    # --- what the spec refers to -----------------------------------------------------------------------

    def context(self) -> Context:
        spec = parse_spec(BackupRestoreSpec, self.body.get("spec"))
        policy = self.policy_spec(spec)
        source = policy.source.postgresql
        if source is None:
            raise RunbookError(
                "NotRestorable",
                f"spec.policyRef: BackupPolicy {spec.policy_ref} backs up {policy.source.kind}; only PostgreSQL "
                "backups are restored by a BackupRestore",
            )
        if policy.encryption.gpg.passphrase_secret_ref is None and spec.decryption_secret_ref is None:
            raise RunbookError(
                "DecryptionKeyMissing",
                f"spec.decryptionSecretRef: BackupPolicy {spec.policy_ref} encrypts to public keys; name the Secret "
                "key holding the private key",
            )
        if spec.target is not None and spec.target.redis is not None:
            raise RunbookError(
                "TargetMismatch",
                f"spec.target.redis: BackupPolicy {spec.policy_ref} backs up PostgreSQL; a PostgreSQL backup is "
                "restored into a database (spec.target host, port, database), not a Redis",
            )
        return Context(spec, policy, resolve_target(spec, source))

    def policy_spec(self, spec: BackupRestoreSpec) -> BackupPolicySpec:
        """The referenced BackupPolicy's spec, or why there is none."""
        try:
            policy_body = kube.custom().get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, POLICIES, spec.policy_ref
            )
        except ApiException as error:
            if error.status == 404:
                raise RunbookError(
                    "PolicyNotFound", f"spec.policyRef: BackupPolicy {spec.policy_ref} not found"
                ) from None
            raise
        try:
            policy = parse_spec(BackupPolicySpec, policy_body.get("spec"))
        except RunbookError as error:
            raise RunbookError(
                "PolicyInvalid", f"spec.policyRef: BackupPolicy {spec.policy_ref}: {error.message}"
            ) from None
        return policy

    def source_kind(self) -> str | None:
        """The referenced policy's source kind; None when it cannot be read (the preflight says why)."""
        try:
            return self.policy_spec(parse_spec(BackupRestoreSpec, self.body.get("spec"))).source.kind
        except RunbookError:
            return None

    def source_steps(self) -> Any:
        """The one dispatch on the policy's source: the steps of a source other than PostgreSQL (whose steps
        are this class's own), or None. Imported here: those modules build on this one."""
        kind = self.source_kind()
        if kind == "kubernetes":
            from .restore_kubernetes import KubernetesSteps

            return KubernetesSteps(self)
        if kind == "redis":
            from .restore_redis import RedisSteps

            return RedisSteps(self)
        return None

    def credentials(self, ctx: Context) -> dict[str, str]:
        """The agent's environment as the Job's pod gets it, read from the same Secrets (for the preflight
        and the checks, which run here)."""
        env = {name: os.environ[name] for name in _TOOL_ENV if name in os.environ}
        login = ctx.target.credentials_secret_ref
        field = "spec.target.credentialsSecretRef"
        env[PG_USER_ENV] = kube.read_secret_value(self.namespace, login.name, login.username_key, field=field)
        env[PG_PASSWORD_ENV] = kube.read_secret_value(self.namespace, login.name, login.password_key, field=field)
        return {**env, **self.storage_credentials(ctx.spec, ctx.policy)}

    def storage_credentials(self, spec: BackupRestoreSpec, policy: BackupPolicySpec) -> dict[str, str]:
        """The S3 keys and the decryption key, as every source's Job gets them."""
        env = {name: os.environ[name] for name in _TOOL_ENV if name in os.environ}
        s3 = policy.destination.s3.credentials_secret_ref
        if s3 is not None:
            field = f"BackupPolicy {spec.policy_ref} spec.destination.s3.credentialsSecretRef"
            env[S3_ACCESS_KEY_ENV] = kube.read_secret_value(self.namespace, s3.name, s3.access_key_id_key, field=field)
            env[S3_SECRET_KEY_ENV] = kube.read_secret_value(
                self.namespace, s3.name, s3.secret_access_key_key, field=field
            )
        passphrase = policy.encryption.gpg.passphrase_secret_ref
        if passphrase is not None:
            field = f"BackupPolicy {spec.policy_ref} spec.encryption.gpg.passphraseSecretRef"
            env[GPG_PASSPHRASE_ENV] = kube.read_secret_value(
                self.namespace, passphrase.name, passphrase.key, field=field
            )
        if spec.decryption_secret_ref is not None:
            ref = spec.decryption_secret_ref
            env[GPG_PRIVATE_KEY_ENV] = kube.read_secret_value(
                self.namespace, ref.name, ref.key, field="spec.decryptionSecretRef"
            )
        return env

    def manifest(self, ctx: Context) -> dict[str, Any]:
        return self.stored_manifest(ctx.spec, ctx.policy)

    def stored_manifest(self, spec: BackupRestoreSpec, policy: BackupPolicySpec) -> dict[str, Any]:
        """The manifest of the backup to restore: the one preflight chose, else as ``spec.backup`` says; it
        must describe a backup of the policy's source kind."""
        location = policy.destination.s3
        client = s3_client(kube.KubeApi(), self.namespace, location, field=S3_CREDENTIALS_FIELD)
        base = policy_folder(location, self.namespace, spec.policy_ref)
        chosen = self.status.get("backupKey") or spec.backup
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
        return manifest

    def plan(self, ctx: Context) -> tuple[RestorePlan, dict[str, Any]]:
        manifest = self.manifest(ctx)
        return build_plan(ctx.policy, manifest, ctx.target, roles=ctx.spec.roles), manifest

    # --- workloads -------------------------------------------------------------------------------------

    @staticmethod
    def _api(kind: str) -> tuple[Any, Any]:
        apps = kube.apps()
        if kind == "StatefulSet":
            return apps.read_namespaced_stateful_set, apps.patch_namespaced_stateful_set
        return apps.read_namespaced_deployment, apps.patch_namespaced_deployment

    def workload(self, kind: str, name: str) -> dict[str, Any] | None:
        read, _ = self._api(kind)
        try:
            found: dict[str, Any] = kube.api_client().sanitize_for_serialization(read(name, self.namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def patch_workload(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        _, write = self._api(kind)
        write(name, self.namespace, patch, field_manager=FIELD_MANAGER)

    # --- the steps -------------------------------------------------------------------------------------

    def advance(self) -> float | None:
        """Do the next step; return the seconds until the next pass (0: at once, None: finished)."""
        phase = self.status.get("phase")
        if phase in TERMINAL:
            return None
        if phase is None:
            self.start()
        elif (steps := self.source_steps()) is not None:
            delay: float | None = steps.advance(phase)
            return delay
        elif phase == PREFLIGHT:
            self.preflight()
        elif phase == SCALING_DOWN:
            return self.scale_down()
        elif phase == RESTORING:
            return self.watch_job()
        elif phase == CHECKING:
            self.check()
        elif phase == SCALING_UP:
            return self.scale_up()
        return None if self.status.get("phase") in TERMINAL else 0

    def start(self) -> None:
        self.status.set(startTime=now_rfc3339())
        self.begin("Preflight", PREFLIGHT)
        self.status.condition("Ready", "False", "Preflight", "verifying the backup before changing anything")
        self.flush()
        metrics.RESTORES.labels(self.namespace, FAILED)  # the series exists at 0 before the first failure
        spec = self.body.get("spec") or {}
        self.event(
            "RestoreStarted", f"restoring {spec.get('backup', 'latest')} of BackupPolicy {spec.get('policyRef')}"
        )
        self.audit("restore_started", dryRun=bool(spec.get("dryRun")), scaleDown=spec.get("scaleDown") or [])

    def preflight(self) -> None:
        try:
            ctx = self.context()
            env = self.credentials(ctx)
            plan, manifest = self.plan(ctx)
            self.status.set(
                backupKey=plan.key,
                backupTime=manifest.get("endTime"),
                target=f"{plan.target.host}:{plan.target.port}/{plan.target.database}",
            )
            for index, ref in enumerate(ctx.spec.scale_down):
                if self.workload(ref.kind, ref.name) is None:
                    raise RunbookError("WorkloadNotFound", f"spec.scaleDown[{index}]: {ref.kind} {ref.name} not found")
            connect_target(plan.target, env).close()
            figures = verify(plan, env)
        except RunbookError as error:
            self.end("Preflight", "Failed", f"{error.reason}: {error.message}")
            self.finish(FAILED, error)
            return
        self.status.set(checks={**(self.status.get("checks") or {}), **figures})
        message = (
            f"{plan.key}: SHA-256 matches the manifest ({plan.size_bytes} bytes), decrypts, "
            f"pg_restore lists {figures['archiveEntries']} entries; target {self.status.get('target')} reachable"
        )
        self.end("Preflight", "Succeeded", message)
        self.event("PreflightPassed", message)
        if ctx.spec.dry_run:
            self.finish(DRY_RUN)
            return
        self.begin("ScaleDown", SCALING_DOWN)
        self.flush()

    def fail_midway(self, step: str, error: RunbookError) -> None:
        """A step after the scale-down failed: record it, then bring the workloads back regardless."""
        self.end(step, "Failed", f"{error.reason}: {error.message}")
        self.status.condition("Ready", "False", error.reason, error.message)
        self.event(error.reason, error.message, warning=True)
        self.begin("ScaleUp", SCALING_UP)
        self.flush()

    def scale_down(self) -> float:
        spec = parse_spec(BackupRestoreSpec, self.body.get("spec"))
        if self.status.get("scaledDown") is None:
            records = []
            for index, ref in enumerate(spec.scale_down):
                workload = self.workload(ref.kind, ref.name)
                if workload is None:
                    self.fail_midway(
                        "ScaleDown",
                        RunbookError("WorkloadNotFound", f"spec.scaleDown[{index}]: {ref.kind} {ref.name} not found"),
                    )
                    return 0
                replicas = (workload.get("spec") or {}).get("replicas", 1)
                records.append({"kind": ref.kind, "name": ref.name, "replicas": replicas})
            self.status.set(scaledDown=records)
            self.flush()  # recorded before anything is scaled
            if records:
                counts = ", ".join(f"{r['kind']} {r['name']}={r['replicas']}" for r in records)
                self.event("ReplicasRecorded", f"recorded {counts}; scaling to 0")
        stopped = True
        for record in self.status.get("scaledDown") or []:
            workload = self.workload(record["kind"], record["name"])
            if workload is None:
                continue
            annotations = workload["metadata"].get("annotations") or {}
            if (workload.get("spec") or {}).get("replicas") != 0 or REPLICAS_ANNOTATION not in annotations:
                self.patch_workload(record["kind"], record["name"], stop_patch(self.uid, record["replicas"]))
                stopped = False
            else:
                stopped = stopped and is_stopped(workload)
        if stopped:
            names = ", ".join(r["name"] for r in self.status.get("scaledDown") or []) or "none"
            self.end("ScaleDown", "Succeeded", f"stopped: {names}")
            self.begin("Restore", RESTORING)
            self.flush()
            return 0
        if _seconds_since(step_started(self.status.get("steps", []), "ScaleDown")) > spec.scale_timeout_seconds:
            self.fail_midway(
                "ScaleDown",
                RunbookError("ScaleDownTimeout", f"workloads still had pods after {spec.scale_timeout_seconds}s"),
            )
            return 0
        return POLL_SECONDS

    def watch_job(self) -> float:
        name = job_name(self.name)
        job = read_job(kube.KubeApi(), self.namespace, name)
        if job is None:
            if self.status.get("jobName"):
                self.fail_midway("Restore", RunbookError("JobMissing", f"Job {name} was deleted before it finished"))
                return 0
            return self.create_job()
        outcome = job_outcome(job)
        if outcome is None:
            return POLL_SECONDS
        if outcome[0] == "Complete":
            self.end("Restore", "Succeeded", f"Job {name} restored {self.status.get('backupKey')} in one transaction")
            self.begin("Check", CHECKING)
            self.flush()
            return 0
        reason, message = failure_reason(
            job, job_pods(kube.KubeApi(), self.namespace, name), prefix=RESTORE_FAILURE_PREFIX
        )
        self.fail_midway("Restore", RunbookError(reason, f"Job {name}: {message}"))
        return 0

    def create_job(self) -> float:
        try:
            ctx = self.context()
            plan, _ = self.plan(ctx)
        except RunbookError as error:
            self.fail_midway("Restore", error)
            return 0
        job = build_job(self.body, plan, policy=ctx.policy, spec=ctx.spec, target=ctx.target, image=self.image)
        try:
            kube.batch().create_namespaced_job(self.namespace, job, field_manager=FIELD_MANAGER)
        except ApiException as error:
            if error.status != 409:
                raise
        self.status.set(jobName=job["metadata"]["name"])
        self.flush()
        self.event(
            "RestoreJobCreated", f"Job {job['metadata']['name']} restores {plan.key} into {self.status.get('target')}"
        )
        return POLL_SECONDS

    def check(self) -> None:
        try:
            ctx = self.context()
            env = self.credentials(ctx)
            plan, manifest = self.plan(ctx)
            figures = check_contents(plan.target, env, manifest.get("source") or {})
        except RunbookError as error:
            self.fail_midway("Check", error)
            return
        self.status.set(checks={**(self.status.get("checks") or {}), **figures})
        found = f"{figures['tables']} tables, {figures['rows']} rows, {figures['sequences']} sequences"
        if figures["largeObjects"] is not None:
            found += f", {figures['largeObjects']} large objects"
        self.end("Check", "Succeeded", f"{found}: as the manifest recorded at backup time")
        self.begin("ScaleUp", SCALING_UP)
        self.flush()

    def scale_up(self) -> float:
        spec = parse_spec(BackupRestoreSpec, self.body.get("spec"))
        waiting: list[str] = []
        for record in self.status.get("scaledDown") or []:
            workload = self.workload(record["kind"], record["name"])
            if workload is None:
                continue  # deleted meanwhile: nothing to bring back
            annotations = workload["metadata"].get("annotations") or {}
            if (workload.get("spec") or {}).get("replicas") != record["replicas"] or REPLICAS_ANNOTATION in annotations:
                self.patch_workload(record["kind"], record["name"], start_patch(record["replicas"]))
                waiting.append(record["name"])
            elif not is_available(workload, record["replicas"]):
                waiting.append(record["name"])
        counts = ", ".join(f"{r['name']}={r['replicas']}" for r in self.status.get("scaledDown") or []) or "none"
        if not waiting:
            self.end("ScaleUp", "Succeeded", f"back at the recorded counts and available: {counts}")
            self.finish(self.outcome())
            return 0
        if _seconds_since(step_started(self.status.get("steps", []), "ScaleUp")) > spec.scale_timeout_seconds:
            late = ", ".join(waiting)
            message = f"replicas set back ({counts}) but not available after {spec.scale_timeout_seconds}s: {late}"
            self.end("ScaleUp", "Failed", f"WorkloadsNotAvailable: {message}")
            if self.outcome() == SUCCEEDED:
                self.status.condition("Ready", "False", "WorkloadsNotAvailable", message)
            self.finish(FAILED)
            return 0
        return POLL_SECONDS

    def outcome(self) -> str:
        failed = any(step["phase"] == "Failed" for step in self.status.get("steps", []))
        return FAILED if failed else SUCCEEDED

    def finish(self, phase: str, error: RunbookError | None = None, *, restored: str | None = None) -> None:
        """End the restore; ``restored`` says what a source other than PostgreSQL restored."""
        self.status.set(phase=phase, completionTime=now_rfc3339())
        checks = self.status.get("checks") or {}
        if error is not None:
            self.status.condition("Ready", "False", error.reason, error.message)
            self.event(error.reason, error.message, warning=True)
        elif phase == DRY_RUN:
            self.status.condition(
                "Ready", "True", "DryRunSucceeded", "the backup is intact and restorable; nothing was changed"
            )
        elif phase == SUCCEEDED and restored is not None:
            self.status.condition("Ready", "True", "Restored", restored)
        elif phase == SUCCEEDED and checks.get("keys") is not None:  # a Redis backup
            message = (
                f"restored {self.status.get('backupKey')} into {self.status.get('target')}: {checks['keys']} keys "
                "as recorded; workloads back at their recorded counts"
            )
            self.status.condition("Ready", "True", "Restored", message)
        elif phase == SUCCEEDED:
            message = (
                f"restored {self.status.get('backupKey')} into {self.status.get('target')}: {checks.get('tables')} "
                f"tables, {checks.get('rows')} rows as recorded; workloads back at their recorded counts"
            )
            self.status.condition("Ready", "True", "Restored", message)
        self.flush()
        ready = next(c for c in self.status.get("conditions", []) if c["type"] == "Ready")
        self.event(f"Restore{phase}", ready["message"], warning=phase == FAILED)
        self.audit(
            "restore_completed",
            outcome=phase,
            reason=ready["reason"],
            durationSeconds=round(_seconds_since(self.status.get("startTime")), 1),
            rows=checks.get("rows"),
        )
        metrics.RESTORES.labels(self.namespace, phase).inc()
        metrics.RESTORE_DURATION.labels(self.namespace, phase).observe(_seconds_since(self.status.get("startTime")))
        drill_of = (self.body["metadata"].get("labels") or {}).get(DRILL_LABEL)
        if drill_of:
            record_drill(self.namespace, drill_of, self.name, self.status.current, ready)


def advance(namespace: str, name: str, *, image: str) -> float | None:
    """One pass over the current state of the object; the seconds until the next (None: finished)."""
    try:
        body = kube.custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    if body["metadata"].get("deletionTimestamp"):
        return None
    return Restore(body, image=image).advance()


def abort_deleted(body: kopf.Body) -> None:
    """Deleted before it finished: the Job goes (its transaction rolls back) and the workloads get their
    recorded counts back at once; the application is never left down by a deletion either."""
    status = body.get("status") or {}
    if status.get("phase") in TERMINAL or not status.get("scaledDown"):
        return
    restore = Restore(dict(body), image="")
    try:
        kube.batch().delete_namespaced_job(job_name(restore.name), restore.namespace, propagation_policy="Background")
    except ApiException as error:
        if error.status != 404:
            raise
    for record in status["scaledDown"]:
        workload = restore.workload(record["kind"], record["name"])
        annotations = (workload or {}).get("metadata", {}).get("annotations") or {}
        if workload is not None and (
            workload["spec"].get("replicas") != record["replicas"] or REPLICAS_ANNOTATION in annotations
        ):
            restore.patch_workload(record["kind"], record["name"], start_patch(record["replicas"]))
    counts = ", ".join(f"{r['name']}={r['replicas']}" for r in status["scaledDown"])
    restore.event(
        "RestoreAborted",
        f"deleted during {status.get('phase')}: Job removed, workloads set back to {counts}",
        warning=True,
    )
    restore.audit("restore_completed", outcome="Aborted", reason="Deleted", phase=status.get("phase"))
    metrics.RESTORES.labels(restore.namespace, "Aborted").inc()


async def run(body: kopf.Body, *, stopped: kopf.DaemonStopped, image: str) -> None:
    """The daemon of one BackupRestore: pass after pass until it has finished."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    failures = 0
    while not stopped:
        try:
            delay = await asyncio.to_thread(advance, namespace, name, image=image)
            failures = 0
        except Exception as error:  # the step is retried where it stands, with backoff
            failures += 1
            delay = backoff(POLL_SECONDS * 5, failures)
            await asyncio.to_thread(_report_stalled, namespace, name, error)
        if delay is None:
            return
        if delay:
            await stopped.wait(delay)


def _report_stalled(namespace: str, name: str, raised: Exception) -> None:
    """A pass that failed unforeseen (an API refusal, S3 down): Ready=False with why, one Event, the phase
    kept (the step is retried as it stands)."""
    try:
        body = kube.custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        restore = Restore(body, image="")
        report_failure(restore.kopf_body, restore.status, raised)
        restore.flush()
    except Exception as error:
        LOG.warning(
            "BackupRestore %s/%s: %s (%s)", namespace, name, as_failure(raised).message, as_failure(error).message
        )


# --- drills: the policy side ----------------------------------------------------------------------------


def record_drill(namespace: str, policy: str, restore: str, status: dict[str, Any], ready: dict[str, Any]) -> None:
    """The drill's outcome on its policy: Verified, and lastVerifiedBackup when it passed (optimistic
    concurrency: the policy's own reconciler writes the same status)."""
    api = kube.custom()
    for _ in range(5):
        try:
            current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, POLICIES, policy)
        except ApiException as error:
            if error.status == 404:
                return
            raise
        patch = StatusPatch(current.get("status"), (current.get("status") or {}).get("observedGeneration"))
        checks = status.get("checks") or {}
        if status.get("phase") == SUCCEEDED:
            key = str(status.get("backupKey") or "")
            verified = {
                "key": key.rsplit("/", 1)[0] + "/",
                "backupTime": status.get("backupTime"),
                "verifiedTime": status.get("completionTime"),
                "restore": restore,
                "tables": checks.get("tables"),
                "rows": checks.get("rows"),
                "keys": checks.get("keys"),
            }
            patch.set(lastVerifiedBackup={k: v for k, v in verified.items() if v is not None})
            found = f"{verified['tables']} tables, {verified['rows']} rows"
            if verified["keys"] is not None:
                found = f"{verified['keys']} keys"
            target = status.get("target")
            message = f"drill {restore} restored {verified['key']} into {target}: {found} match the manifest"
            patch.condition("Verified", "True", "DrillPassed", message)
        else:
            patch.condition("Verified", "False", ready["reason"], f"drill {restore}: {ready['message']}")
        changes = dict(patch.changes)
        changes.pop("observedGeneration", None)
        if not changes:
            return
        body = {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]}, "status": changes}
        try:
            api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, POLICIES, policy, body)
        except ApiException as error:
            if error.status == 409:
                continue
            raise
        if status.get("phase") == SUCCEEDED:
            when = datetime.fromisoformat(str(status.get("completionTime")).replace("Z", "+00:00"))
            metrics.BACKUP_LAST_VERIFIED.labels(namespace, policy).set(when.timestamp())
        metrics.BACKUP_LAST_DRILL_PASSED.labels(namespace, policy).set(int(status.get("phase") == SUCCEEDED))
        condition = next(c for c in patch.get("conditions") if c["type"] == "Verified")
        post = kopf.info if condition["status"] == "True" else kopf.warn
        post(
            kopf.Body(current),
            reason="Verified" if condition["status"] == "True" else "DrillFailed",
            message=condition["message"],
        )
        return


def drills_enabled(spec: kopf.Spec, **_: Any) -> bool:
    return bool(spec.get("verification"))


def schedule_drills(namespace: str, name: str) -> float:
    """Create the drill of the newest scheduled time that has none yet; the seconds until the next one."""
    try:
        body = kube.custom().get_namespaced_custom_object(GROUP, VERSION, namespace, POLICIES, name)
    except ApiException as error:
        if error.status == 404:
            return 3600.0
        raise
    try:
        spec = parse_spec(BackupPolicySpec, body.get("spec"))
    except RunbookError:
        return 300.0  # the policy's reconciler reports it
    if spec.verification is None:
        return 3600.0
    now = datetime.now(zoneinfo.ZoneInfo(spec.verification.time_zone))
    schedule = croniter(spec.verification.schedule, now)
    previous: datetime = schedule.get_prev(datetime)
    upcoming: datetime = croniter(spec.verification.schedule, now).get_next(datetime)
    created = datetime.fromisoformat(body["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    api = kube.custom()
    if previous >= created:
        drill = build_drill(body, spec.verification, previous)
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, drill)
            kopf.info(kopf.Body(body), reason="DrillStarted", message=f"BackupRestore {drill['metadata']['name']}")
        except ApiException as error:
            if error.status != 409:
                raise
    drills = api.list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, label_selector=f"{DRILL_LABEL}={name}"
    )["items"]
    finished = sorted(
        (d for d in drills if (d.get("status") or {}).get("phase") in TERMINAL),
        key=lambda d: d["metadata"]["creationTimestamp"],
    )
    for old in finished[:-DRILL_HISTORY]:
        try:
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, old["metadata"]["name"])
        except ApiException as error:
            if error.status != 404:
                raise
    return max(1.0, (upcoming - now).total_seconds())


async def run_drills(body: kopf.Body, *, stopped: kopf.DaemonStopped) -> None:
    """The drill clock of one policy with ``verification``."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    failures = 0
    while not stopped:
        try:
            delay = await asyncio.to_thread(schedule_drills, namespace, name)
            failures = 0
        except Exception as error:
            failures += 1
            delay = backoff(30.0, failures)
            LOG.warning("BackupPolicy %s/%s drills: %s; trying again", namespace, name, as_failure(error).message)
        await stopped.wait(delay)
