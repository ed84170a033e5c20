"""A Kubernetes export's restore as manifests, pure: the plan, the Job that applies the section, and that Job's
ServiceAccount with write access to the exportable resources in the target namespace only.

The write access is not a Role the operator writes: the API server lets a subject grant only what it holds,
so a Role would need the operator itself to hold create/patch on every exportable resource in every
namespace. Instead an administrator installs two ClusterRoles with exactly those verbs on exactly those
resources (deploy/base/restore-rbac.yaml: one without Secrets, one with Secrets only), and the operator may
only ``bind`` them (by name): a RoleBinding in the target namespace gives the Job's ServiceAccount that
access there and nowhere else, Secrets only when the restore asks for them."""

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

# The administrator-installed ClusterRoles the restore Job is bound to (deploy/base/restore-rbac.yaml).
APPLY_CLUSTER_ROLE = "runbook-operator-restore-kubernetes"
SECRETS_CLUSTER_ROLE = "runbook-operator-restore-kubernetes-secrets"


def build_kubernetes_plan(
    policy: BackupPolicySpec,
    manifest: Mapping[str, Any],
    choice: KubernetesRestore,
    *,
    namespace: str,
    dry_run: bool,
) -> KubernetesRestorePlan:
    """What the Job needs: the backup's object from the manifest, the section, where and how to apply it."""
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
    )


def _labels(name: str) -> dict[str, str]:
    return {**MANAGED_BY, RESTORE_LABEL: name, "app.kubernetes.io/component": "restore"}


def build_restore_rbac(body: Mapping[str, Any], plan: KubernetesRestorePlan) -> list[dict[str, Any]]:
    """The Job's ServiceAccount and, in the target namespace, its RoleBindings to the ClusterRoles (the
    Secrets one only with includeSecrets); all owned by the BackupRestore."""
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    account = job_name(name)
    owned = {"labels": _labels(name), "ownerReferences": [owner_reference(body)]}
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": account, "namespace": namespace, **owned},
            "automountServiceAccountToken": False,
        }
    ]
    roles = [APPLY_CLUSTER_ROLE] + ([SECRETS_CLUSTER_ROLE] if plan.include_secrets else [])
    for role in roles:
        suffix = "-secrets" if role == SECRETS_CLUSTER_ROLE else ""
        objects.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": f"{account}{suffix}", "namespace": plan.namespace, **owned},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
            }
        )
    return objects


def build_kubernetes_job(
    body: Mapping[str, Any],
    plan: KubernetesRestorePlan,
    *,
    policy: BackupPolicySpec,
    spec: BackupRestoreSpec,
    image: str,
) -> dict[str, Any]:
    """The Job that runs ``runbook-operator restore-kubernetes`` once, as the restore's own ServiceAccount."""
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    env: list[dict[str, Any]] = [
        {"name": RESTORE_PLAN_ENV, "value": json.dumps(plan.to_api(), sort_keys=True, separators=(",", ":"))},
        {"name": "HOME", "value": TMP_DIR},
        *storage_env(policy=policy, spec=spec, symmetric=plan.symmetric),
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
                    service_account=job_name(name),
                ),
            },
        },
    }
