"""BackupRestore of a Kubernetes export: Preflight (in the operator, read-only), then the Job that applies the
section (in a dry run too: the dry run is the API server's), then the summary from the Job into status.

- **Preflight**: the spec must suit a Kubernetes backup (no PostgreSQL ``target``, no ``scaleDown``), the
  target namespace must be the BackupRestore's own (tenancy: writing elsewhere needs a grant no namespace
  user can make, and the operator has no such grant to check), the manifest must list the chosen section
  and, with ``includeSecrets``, Secrets (all in the operator); then the verify Job (``verify --source
  kubernetes``) streams the stored object through gpg (SHA-256, full decryption, the section's objects
  parse). Any failure ends the restore here, nothing changed.
  The Job's ServiceAccount (the enabling bundle's, an administrator's) must exist (``ServiceAccountMissing``).
- **Restore**: the Job, run as that ServiceAccount; when it completes its summary (termination message)
  becomes ``status.kubernetes``. Objects the API server refused fail the restore (``ApplyFailed``); objects
  that differ and were left alone (``conflicts: Skip``) are reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..builders.restore_kubernetes import build_kubernetes_job, build_kubernetes_plan, restore_service_account
from ..clients import kube
from ..errors import RunbookError
from ..models.backup import KubernetesRestore, KubernetesRestoreSummary, RestoreStepName
from ..models.plans import KubernetesRestorePlan, StoredObjectPlan
from ..settings import agent_image
from .jobs import job_summary
from .restore import Restore

_SUMMARY_KEYS = ("created", "replaced", "skipped", "unchanged", "failed")


class KubernetesTarget:
    """A Kubernetes export, one namespace section re-applied into the restore's own namespace."""

    source = "kubernetes"

    def __init__(self, restore: Restore) -> None:
        self.restore = restore

    def steps(self, dry_run: bool) -> tuple[RestoreStepName, ...]:
        return (RestoreStepName.PREFLIGHT, RestoreStepName.RESTORE)

    # --- what the spec refers to -----------------------------------------------------------------------

    def plan(self) -> tuple[KubernetesRestorePlan, dict[str, Any]]:
        restore = self.restore
        spec, policy = restore.spec, restore.policy
        assert policy.source.kubernetes is not None  # dispatched on it
        if spec.target is not None:
            raise RunbookError(
                "TargetMismatch",
                f"spec.target: BackupPolicy {spec.policy_ref} exports Kubernetes objects; spec.target names a "
                "PostgreSQL database (use spec.kubernetes)",
            )
        if spec.scale_down:
            raise RunbookError("InvalidSpec", "spec.scaleDown: a Kubernetes export's restore scales nothing")
        restore.decryptable()
        choice = spec.kubernetes or KubernetesRestore()  # its targetNamespace: tenancy.confine_backup_restore
        manifest = restore.manifest()
        plan = build_kubernetes_plan(
            policy, manifest, choice, namespace=restore.namespace, dry_run=spec.dry_run, etag=restore.etag
        )
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
        return plan, manifest

    # --- the steps -------------------------------------------------------------------------------------

    def preflight(self) -> tuple[KubernetesRestorePlan, dict[str, Any]]:
        restore = self.restore
        plan, manifest = self.plan()
        restore.chosen(plan.key, manifest, f"namespace {plan.namespace}")
        account = restore_service_account(plan)
        if restore.api.get(kube.SERVICE_ACCOUNTS, restore.namespace, account) is None:
            raise RunbookError(
                "ServiceAccountMissing",
                f"ServiceAccount {account} not found in namespace {restore.namespace}: the restore Job runs as it; "
                "a cluster administrator creates it when enabling the namespace (deploy/base/namespace-enable/)",
            )
        restore.storage_secrets()
        return plan, manifest

    def verified(self, plan: StoredObjectPlan, figures: Mapping[str, Any]) -> str:
        assert isinstance(plan, KubernetesRestorePlan)
        return (
            f"{plan.key}: SHA-256 matches the manifest ({plan.size_bytes} bytes), decrypts; section {plan.section} "
            f"has {figures.get('archiveEntries')} objects for namespace {plan.namespace}"
        )

    def job(self) -> tuple[dict[str, Any], str]:
        restore = self.restore
        plan, _ = self.plan()
        job = build_kubernetes_job(
            restore.ctx.body, plan, policy=restore.policy, spec=restore.spec, image=agent_image()
        )
        dry = " (the API server's dry run)" if plan.dry_run else ""
        message = (
            f"Job {job['metadata']['name']} applies section {plan.section} of {plan.key} into {plan.namespace}{dry}"
        )
        return job, message

    def job_done(self, name: str, pods: list[dict[str, Any]]) -> str:
        summary = job_summary(pods, "kubernetes")
        if summary is None:
            raise RunbookError("SummaryMissing", f"Job {name} completed without its summary")
        self.restore.status.kubernetes = KubernetesRestoreSummary.model_validate(summary)
        counts = summary.get("counts") or {}
        figures = ", ".join(f"{counts.get(key, 0)} {key}" for key in _SUMMARY_KEYS)
        would = "dry run: would be " if summary.get("dryRun") else ""
        message = f"section {summary.get('section')} into namespace {summary.get('namespace')}: {would}{figures}"
        if counts.get("failed"):
            failed = "; ".join(summary.get("failed") or [])
            raise RunbookError("ApplyFailed", f"{message}: refused: {failed}"[:1000])
        return message

    def job_ended(self) -> None:
        pass

    def check(self) -> str:
        raise RunbookError("InvalidPhase", "status.phase Checking is not a step of a Kubernetes export's restore")

    def restored(self) -> str:
        restore = self.restore
        steps = [s for s in restore.status.steps if s.name == RestoreStepName.RESTORE]
        return f"restored {restore.status.backup_key}: {steps[-1].message if steps else ''}"
