"""A Kubernetes export's restore as manifests, pure: the plan and the Job that applies the section.

The Job's write access is not the operator's: it runs as a ServiceAccount a cluster administrator created
when enabling the namespace (deploy/base/namespace-enable/), bound there to a ClusterRole with exactly
get/create/patch on exactly the exportable resources (deploy/base/agent-rbac.yaml); with includeSecrets as
the one whose binding adds Secrets. The operator holds none of that access, binds nothing, and only names
the ServiceAccount."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..models.backup import BackupPolicySpec, BackupRestoreSpec, KubernetesRestore
from ..models.plans import KubernetesRestorePlan
from .backup import agent_pod_spec
from .restore import CONTAINER, job_name, plan_env, restore_job

# The restore Job's ServiceAccounts, created with the namespace's enabling bundle.
RESTORE_SERVICE_ACCOUNT = "runbook-restore-kubernetes"
RESTORE_SECRETS_SERVICE_ACCOUNT = "runbook-restore-kubernetes-secrets"


def build_kubernetes_plan(
    policy: BackupPolicySpec,
    manifest: Mapping[str, Any],
    choice: KubernetesRestore,
    *,
    namespace: str,
    dry_run: bool,
    etag: str | None = None,
) -> KubernetesRestorePlan:
    """What the Job needs: the backup's object from the manifest (carried as read) and the preflight's ETag,
    the section, where and how to apply it."""
    data = manifest["data"]
    return KubernetesRestorePlan(
        location=policy.destination.s3,
        key=data["key"],
        sha256=data["sha256"],
        size_bytes=data["sizeBytes"],
        symmetric=(manifest.get("encryption") or {}).get("mode") == "symmetric",
        section=choice.namespace or namespace,
        namespace=choice.target_namespace or namespace,
        include_secrets=choice.include_secrets,
        conflicts=choice.conflicts,
        dry_run=dry_run,
        manifest=dict(manifest),
        etag=etag,
    )


def restore_service_account(plan: KubernetesRestorePlan) -> str:
    """The ServiceAccount the Job runs as: the one whose access includes Secrets only with includeSecrets."""
    return RESTORE_SECRETS_SERVICE_ACCOUNT if plan.include_secrets else RESTORE_SERVICE_ACCOUNT


def build_kubernetes_job(
    body: Mapping[str, Any],
    plan: KubernetesRestorePlan,
    *,
    policy: BackupPolicySpec,
    spec: BackupRestoreSpec,
    image: str,
) -> dict[str, Any]:
    """The Job that runs ``runbook-operator restore-kubernetes`` once, as the administrator's ServiceAccount."""
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    pod = agent_pod_spec(
        container=CONTAINER,
        image=image,
        args=["restore-kubernetes", "--namespace", namespace, "--name", name],
        env=plan_env(plan, policy=policy, spec=spec),
        service_account=restore_service_account(plan),
    )
    return restore_job(body, name=job_name(name), component="restore", pod=pod, deadline=policy.active_deadline_seconds)
