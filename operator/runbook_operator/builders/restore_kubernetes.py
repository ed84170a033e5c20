"""A Kubernetes export's restore as manifests, pure: the plan and the Job that applies the section.

The Job's write access is not the operator's: it runs as a ServiceAccount a cluster administrator created
when enabling the namespace (deploy/base/namespace-enable/), bound there to a ClusterRole with exactly
get/create/patch on exactly the exportable resources (deploy/base/agent-rbac.yaml); with includeSecrets as
the one whose binding adds Secrets. The operator holds none of that access, binds nothing, and only names
the ServiceAccount."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..models.backup import BackupPolicySpec, BackupRestoreSpec, KubernetesRestore
from ..models.plans import RESTORE_PLAN_ENV, KubernetesRestorePlan
from ..settings import MANAGED_BY
from .backup import TMP_DIR, agent_pod_spec
from .common import owner_reference
from .restore import CONTAINER, RESTORE_LABEL, job_name, storage_env

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


def _labels(name: str) -> dict[str, str]:
    return {**MANAGED_BY, RESTORE_LABEL: name, "app.kubernetes.io/component": "restore"}


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
    env: list[dict[str, Any]] = [
        {"name": RESTORE_PLAN_ENV, "value": json.dumps(plan.to_api(), sort_keys=True, separators=(",", ":"))},
        {"name": "HOME", "value": TMP_DIR},
        *storage_env(policy=policy, spec=spec, symmetric=plan.symmetric, manifest=plan.manifest),
    ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name),
            "namespace": namespace,
            "labels": _labels(name),
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": policy.active_deadline_seconds,
            "template": {
                "metadata": {"labels": _labels(name)},
                "spec": agent_pod_spec(
                    container=CONTAINER,
                    image=image,
                    args=["restore-kubernetes", "--namespace", namespace, "--name", name],
                    env=env,
                    service_account=restore_service_account(plan),
                ),
            },
        },
    }
