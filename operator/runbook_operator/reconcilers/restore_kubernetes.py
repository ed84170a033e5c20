"""BackupRestore of a Kubernetes export: Preflight (in the operator, read-only), then the Job that applies the
section (in a dry run too: the dry run is the API server's), then the summary from the Job into status.

- **Preflight**: the spec must suit a Kubernetes backup (no PostgreSQL ``target``, no ``scaleDown``), the
  target namespace must be the BackupRestore's own (tenancy: writing elsewhere needs a grant no namespace
  user can make, and the operator has no such grant to check), the manifest must list the chosen section
  and, with ``includeSecrets``, Secrets; the stored object is streamed through gpg (SHA-256, full
  decryption, the section's objects parse). Any failure ends the restore here, nothing changed.
- **Restoring**: the Job's ServiceAccount and RoleBindings are applied, then the Job; when it completes its
  summary (termination message) becomes ``status.kubernetes``. Objects the API server refused fail the
  restore (``ApplyFailed``); objects that differ and were left alone (``conflicts: Skip``) are reported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubernetes.client import ApiException

from ..agent.restore_kubernetes import verify_kubernetes
from ..builders.restore import job_name
from ..builders.restore_kubernetes import build_kubernetes_job, build_kubernetes_plan, build_restore_rbac
from ..clients import kube
from ..errors import RunbookError
from ..models.backup import BackupPolicySpec, BackupRestoreSpec, KubernetesRestore
from ..models.plans import KubernetesRestorePlan
from ..settings import FIELD_MANAGER
from .backup import apply_child
from .base import parse_spec
from .jobs import failure_reason, job_outcome, job_pods, job_summary, read_job

if TYPE_CHECKING:
    from .restore import Restore

_SUMMARY_KEYS = ("created", "replaced", "skipped", "unchanged", "failed")


class KubernetesSteps:
    """The steps of one BackupRestore whose policy exports Kubernetes objects."""

    def __init__(self, restore: Restore) -> None:
        self.restore = restore

    def advance(self, phase: str) -> float | None:
        from .restore import PREFLIGHT, RESTORING, TERMINAL

        if phase == PREFLIGHT:
            self.preflight()
        elif phase == RESTORING:
            return self.watch_job()
        else:  # a phase of another source's steps: not reached for a Kubernetes restore
            self.restore.finish("Failed", RunbookError("InvalidPhase", f"status.phase {phase} is not a step here"))
        return None if self.restore.status.get("phase") in TERMINAL else 0

    # --- what the spec refers to -----------------------------------------------------------------------

    def plan(self) -> tuple[BackupRestoreSpec, BackupPolicySpec, KubernetesRestorePlan, dict[str, Any]]:
        restore = self.restore
        spec = parse_spec(BackupRestoreSpec, restore.body.get("spec"))
        policy = restore.policy_spec(spec)
        source = policy.source.kubernetes
        assert source is not None  # dispatched on it
        if spec.target is not None:
            raise RunbookError(
                "TargetMismatch",
                f"spec.target: BackupPolicy {spec.policy_ref} exports Kubernetes objects; spec.target names a "
                "PostgreSQL database (use spec.kubernetes)",
            )
        if spec.scale_down:
            raise RunbookError("InvalidSpec", "spec.scaleDown: a Kubernetes export's restore scales nothing")
        if policy.encryption.gpg.passphrase_secret_ref is None and spec.decryption_secret_ref is None:
            raise RunbookError(
                "DecryptionKeyMissing",
                f"spec.decryptionSecretRef: BackupPolicy {spec.policy_ref} encrypts to public keys; name the Secret "
                "key holding the private key",
            )
        choice = spec.kubernetes or KubernetesRestore()
        if choice.target_namespace not in (None, restore.namespace):
            raise RunbookError(
                "NamespaceNotAllowed",
                f"spec.kubernetes.targetNamespace: a BackupRestore applies only into its own namespace "
                f"{restore.namespace}, not {choice.target_namespace}",
            )
        manifest = restore.stored_manifest(spec, policy)
        plan = build_kubernetes_plan(policy, manifest, choice, namespace=restore.namespace, dry_run=spec.dry_run)
        recorded = manifest.get("source") or {}
        sections = [str(n) for n in recorded.get("namespaces") or []]
        if plan.section not in sections:
            raise RunbookError(
                "SectionNotFound",
                f"spec.kubernetes.namespace: backup {plan.key} has no section for namespace {plan.section} "
                f"(it has {', '.join(sections) or 'none'})",
            )
        if plan.include_secrets and "secrets" not in (recorded.get("resources") or []):
            raise RunbookError(
                "SecretsNotInBackup",
                f"spec.kubernetes.includeSecrets: backup {plan.key} has no Secrets (its policy did not includeSecrets)",
            )
        return spec, policy, plan, manifest

    # --- the steps -------------------------------------------------------------------------------------

    def preflight(self) -> None:
        from .restore import FAILED, RESTORING

        restore = self.restore
        try:
            spec, policy, plan, manifest = self.plan()
            restore.status.set(
                backupKey=plan.key, backupTime=manifest.get("endTime"), target=f"namespace {plan.namespace}"
            )
            figures = verify_kubernetes(plan, restore.storage_credentials(spec, policy))
        except RunbookError as error:
            restore.end("Preflight", "Failed", f"{error.reason}: {error.message}")
            restore.finish(FAILED, error)
            return
        restore.status.set(checks={**(restore.status.get("checks") or {}), **figures})
        message = (
            f"{plan.key}: SHA-256 matches the manifest ({plan.size_bytes} bytes), decrypts; section {plan.section} "
            f"has {figures['archiveEntries']} objects for namespace {plan.namespace}"
        )
        restore.end("Preflight", "Succeeded", message)
        restore.event("PreflightPassed", message)
        restore.begin("Restore", RESTORING)
        restore.flush()

    def watch_job(self) -> float:
        from .restore import POLL_SECONDS, RESTORE_FAILURE_PREFIX

        restore = self.restore
        name = job_name(restore.name)
        job = read_job(kube.KubeApi(), restore.namespace, name)
        if job is None:
            if restore.status.get("jobName"):
                self.fail(RunbookError("JobMissing", f"Job {name} was deleted before it finished"))
                return 0
            return self.create_job()
        outcome = job_outcome(job)
        if outcome is None:
            return POLL_SECONDS
        pods = job_pods(kube.KubeApi(), restore.namespace, name)
        if outcome[0] != "Complete":
            reason, message = failure_reason(job, pods, prefix=RESTORE_FAILURE_PREFIX)
            self.fail(RunbookError(reason, f"Job {name}: {message}"))
            return 0
        summary = job_summary(pods, "kubernetes")
        if summary is None:
            self.fail(RunbookError("SummaryMissing", f"Job {name} completed without its summary"))
            return 0
        restore.status.set(kubernetes=summary)
        counts = summary.get("counts") or {}
        figures = ", ".join(f"{counts.get(key, 0)} {key}" for key in _SUMMARY_KEYS)
        would = "dry run: would be " if summary.get("dryRun") else ""
        message = f"section {summary.get('section')} into namespace {summary.get('namespace')}: {would}{figures}"
        if counts.get("failed"):
            failed = "; ".join(summary.get("failed") or [])
            self.fail(RunbookError("ApplyFailed", f"{message}: refused: {failed}"[:1000]))
            return 0
        restore.end("Restore", "Succeeded", message)
        self.finish(message, dry_run=bool(summary.get("dryRun")))
        return 0

    def create_job(self) -> float:
        from .restore import POLL_SECONDS

        restore = self.restore
        try:
            spec, policy, plan, _ = self.plan()
        except RunbookError as error:
            self.fail(error)
            return 0
        for child in build_restore_rbac(restore.body, plan):
            apply_child(kube.KubeApi(), child)
        job = build_kubernetes_job(restore.body, plan, policy=policy, spec=spec, image=restore.image)
        try:
            kube.batch().create_namespaced_job(restore.namespace, job, field_manager=FIELD_MANAGER)
        except ApiException as error:
            if error.status != 409:
                raise
        restore.status.set(jobName=job["metadata"]["name"])
        restore.flush()
        dry = " (the API server's dry run)" if plan.dry_run else ""
        restore.event(
            "RestoreJobCreated",
            f"Job {job['metadata']['name']} applies section {plan.section} of {plan.key} into {plan.namespace}{dry}",
        )
        return POLL_SECONDS

    def revoke(self) -> None:
        """The Job has ended: its write access goes (the ServiceAccount stays with the restore, owned by it)."""
        for binding in (job_name(self.restore.name), f"{job_name(self.restore.name)}-secrets"):
            try:
                kube.rbac().delete_namespaced_role_binding(binding, self.restore.namespace)
            except ApiException as error:
                if error.status != 404:
                    raise

    def fail(self, error: RunbookError) -> None:
        from .restore import FAILED

        self.revoke()
        self.restore.end("Restore", "Failed", f"{error.reason}: {error.message}")
        self.restore.finish(FAILED, error)

    def finish(self, message: str, *, dry_run: bool) -> None:
        from .restore import DRY_RUN, SUCCEEDED

        self.revoke()
        if dry_run:
            self.restore.finish(DRY_RUN)
        else:
            self.restore.finish(SUCCEEDED, restored=f"restored {self.restore.status.get('backupKey')}: {message}")
