"""BackupRestore's manifests and records, as pure functions: the restore plan, the Jobs that run the agent
(the preflight's verify Job, the restore Job), the workload patches that stop and restart, and the drills a
policy's verification creates."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..models import API_VERSION
from ..models.backup import BackupPolicySpec, BackupRestoreSpec, RestoreRoles, Verification
from ..models.plans import (
    GPG_PASSPHRASE_ENV,
    GPG_PRIVATE_KEY_ENV,
    MANIFEST_KEY_ENV,
    MANIFEST_KEY_SECRET,
    MANIFEST_KEY_SECRET_KEY,
    PG_PASSWORD_ENV,
    PG_USER_ENV,
    RESTORE_PLAN_ENV,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
    SIGNATURE,
    RestorePlan,
    RoleRecord,
    StoredObjectPlan,
)
from ..models.sources import PostgresConnection
from ..settings import MANAGED_BY, PREFIX
from .backup import TMP_DIR, agent_pod_spec, postgres_tls_files, secret_env
from .common import owner_reference

RESTORE_LABEL = f"{PREFIX}/backup-restore"
DRILL_LABEL = f"{PREFIX}/drill-of"
REPLICAS_ANNOTATION = f"{PREFIX}/restore-replicas"
CONTAINER = "restore"
VERIFY_CONTAINER = "verify"
DRILL_HISTORY = 3  # finished drills kept per policy
_MAX_NAME = 63  # a Job's name becomes a label value of its pods


def _short(name: str, limit: int) -> str:
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-.')}-{digest}"


def job_name(restore: str) -> str:
    """``restore-<name>``, shortened with a hash when long."""
    return _short(f"restore-{restore}", _MAX_NAME)


def verify_job_name(restore: str) -> str:
    """``verify-<name>``: the preflight's Job, shortened with a hash when long."""
    return _short(f"verify-{restore}", _MAX_NAME)


def resolve_target(spec: BackupRestoreSpec, source: PostgresConnection) -> PostgresConnection:
    """The database restored into: the spec's target fields over the policy's source."""
    return source if spec.target is None else spec.target.resolve(source)


def build_plan(
    policy: BackupPolicySpec,
    manifest: Mapping[str, Any],
    target: PostgresConnection,
    *,
    roles: RestoreRoles | None = None,
    etag: str | None = None,
) -> RestorePlan:
    """What the agent needs, from the policy's bucket, the backup's manifest (carried as read, for the agent
    to verify its signature), the preflight's ``etag`` and the restore's ``spec.roles`` (the backed-up roles
    travel only when they are to be created)."""
    data = manifest["data"]
    source = manifest.get("source") or {}
    choices = roles or RestoreRoles()
    return RestorePlan(
        location=policy.destination.s3,
        key=data["key"],
        sha256=data["sha256"],
        size_bytes=data["sizeBytes"],
        symmetric=(manifest.get("encryption") or {}).get("mode") == "symmetric",
        tables=sorted(source.get("tableRowCounts") or {}),
        table_oids=source.get("tableOids") or {},
        target=target,
        roles=choices,
        backup_roles=[RoleRecord.model_validate(r) for r in source.get("roles") or []]
        if choices.create_missing
        else [],
        manifest=dict(manifest),
        etag=etag,
    )


def agent_env(
    plan: RestorePlan, *, policy: BackupPolicySpec, spec: BackupRestoreSpec, target: PostgresConnection
) -> list[dict[str, Any]]:
    """The Job's environment: the plan (references only) and every credential as a Secret reference."""
    login = target.credentials_secret_ref
    return [
        *plan_env(plan, policy=policy, spec=spec),
        secret_env(PG_USER_ENV, login.name, login.username_key),
        secret_env(PG_PASSWORD_ENV, login.name, login.password_key),
        *postgres_tls_files(target.tls)[0],
    ]


def plan_env(plan: StoredObjectPlan, *, policy: BackupPolicySpec, spec: BackupRestoreSpec) -> list[dict[str, Any]]:
    """What every restore and verify Job's agent starts from: the plan (references only), gpg's home, and the
    Secret references it reads the backup with (``storage_env``)."""
    return [
        {"name": RESTORE_PLAN_ENV, "value": json.dumps(plan.to_api(), sort_keys=True, separators=(",", ":"))},
        {"name": "HOME", "value": TMP_DIR},
        *storage_env(policy=policy, spec=spec, symmetric=plan.symmetric, manifest=plan.manifest),
    ]


def storage_env(
    *, policy: BackupPolicySpec, spec: BackupRestoreSpec, symmetric: bool, manifest: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """What every source's restore Job reads the backup with: the S3 keys, the decryption key and the
    namespace's manifest signing key (Secret references). The signing key is left out only for an unsigned
    manifest that ``spec.allowUnsignedBackup`` accepts (the agent would refuse it, as it should any other)."""
    env: list[dict[str, Any]] = []
    if not (spec.allow_unsigned_backup and not (manifest or {}).get(SIGNATURE)):
        env.append(secret_env(MANIFEST_KEY_ENV, MANIFEST_KEY_SECRET, MANIFEST_KEY_SECRET_KEY))
    s3 = policy.destination.s3.credentials_secret_ref
    if s3 is not None:
        env += [
            secret_env(S3_ACCESS_KEY_ENV, s3.name, s3.access_key_id_key),
            secret_env(S3_SECRET_KEY_ENV, s3.name, s3.secret_access_key_key),
        ]
    passphrase = policy.encryption.gpg.passphrase_secret_ref
    if symmetric and passphrase is not None:
        env.append(secret_env(GPG_PASSPHRASE_ENV, passphrase.name, passphrase.key))
    elif spec.decryption_secret_ref is not None:
        env.append(secret_env(GPG_PRIVATE_KEY_ENV, spec.decryption_secret_ref.name, spec.decryption_secret_ref.key))
    return env


def restore_job(
    body: Mapping[str, Any], *, name: str, component: str, pod: dict[str, Any], deadline: int
) -> dict[str, Any]:
    """A Job of the BackupRestore ``body`` that runs ``pod`` once (no retries: neither a restore nor its
    preflight is repeated blindly), owned by it."""
    labels = {**MANAGED_BY, RESTORE_LABEL: body["metadata"]["name"], "app.kubernetes.io/component": component}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": body["metadata"]["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": deadline,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def build_job(
    body: Mapping[str, Any],
    plan: RestorePlan,
    *,
    policy: BackupPolicySpec,
    spec: BackupRestoreSpec,
    target: PostgresConnection,
    image: str,
) -> dict[str, Any]:
    """The Job that runs ``runbook-operator restore`` once."""
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    _, volumes, mounts = postgres_tls_files(target.tls)
    pod = agent_pod_spec(
        container=CONTAINER,
        image=image,
        args=["restore", "--namespace", namespace, "--name", name],
        env=agent_env(plan, policy=policy, spec=spec, target=target),
        volumes=volumes,
        mounts=mounts,
    )
    return restore_job(body, name=job_name(name), component="restore", pod=pod, deadline=policy.active_deadline_seconds)


def build_verify_job(
    body: Mapping[str, Any],
    plan: StoredObjectPlan,
    *,
    source: str,
    policy: BackupPolicySpec,
    spec: BackupRestoreSpec,
    image: str,
) -> dict[str, Any]:
    """The preflight's Job: ``runbook-operator verify --source <kind>`` reads every byte of the backup (size and
    SHA-256 against the manifest, full decryption, the contents' shape) out of the operator's pod, and reports
    its figures or its reason in its termination message. It gets what reading the backup takes (the S3 keys,
    the decryption key, the manifest signing key) and nothing of the target: no login, no API access."""
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    pod = agent_pod_spec(
        container=VERIFY_CONTAINER,
        image=image,
        args=["verify", "--source", source, "--namespace", namespace, "--name", name],
        env=plan_env(plan, policy=policy, spec=spec),
    )
    return restore_job(
        body, name=verify_job_name(name), component="restore-verify", pod=pod, deadline=policy.active_deadline_seconds
    )


# --- workloads ----------------------------------------------------------------------------------------


def stop_patch(uid: str, replicas: int) -> dict[str, Any]:
    """Scale to zero, recording on the workload itself what to come back to (and which restore did it)."""
    record = json.dumps({"restore": uid, "replicas": replicas}, sort_keys=True)
    return {"metadata": {"annotations": {REPLICAS_ANNOTATION: record}}, "spec": {"replicas": 0}}


def start_patch(replicas: int) -> dict[str, Any]:
    return {"metadata": {"annotations": {REPLICAS_ANNOTATION: None}}, "spec": {"replicas": replicas}}


def is_stopped(workload: Mapping[str, Any]) -> bool:
    """Asked for zero, and the controller has seen that and has no pods left."""
    status = workload.get("status") or {}
    return (
        (workload.get("spec") or {}).get("replicas") == 0
        and (status.get("observedGeneration") or 0) >= (workload["metadata"].get("generation") or 0)
        and not status.get("replicas")
    )


def is_available(workload: Mapping[str, Any], replicas: int) -> bool:
    """Running the recorded count, all updated and available."""
    status = workload.get("status") or {}
    if (workload.get("spec") or {}).get("replicas") != replicas:
        return False
    if (status.get("observedGeneration") or 0) < (workload["metadata"].get("generation") or 0):
        return False
    if replicas == 0:
        return not status.get("replicas")
    return (status.get("availableReplicas") or 0) >= replicas and (status.get("updatedReplicas") or 0) >= replicas


# --- drills -------------------------------------------------------------------------------------------


def drill_name(policy: str, slot: datetime) -> str:
    """One name per policy and scheduled time, so a drill is created once however often this runs."""
    return _short(f"{policy}-drill-{slot:%Y%m%d%H%M}", 253 - 8)


def build_drill(policy_body: Mapping[str, Any], verification: Verification, slot: datetime) -> dict[str, Any]:
    """A BackupRestore of the newest backup into the scratch database, owned by the policy."""
    metadata = policy_body["metadata"]
    policy = metadata["name"]
    return {
        "apiVersion": API_VERSION,
        "kind": "BackupRestore",
        "metadata": {
            "name": drill_name(policy, slot),
            "namespace": metadata["namespace"],
            "labels": {**MANAGED_BY, DRILL_LABEL: policy},
            "annotations": {f"{PREFIX}/drill-slot": slot.isoformat()},
            "ownerReferences": [owner_reference({"apiVersion": API_VERSION, "kind": "BackupPolicy", **policy_body})],
        },
        "spec": {
            "policyRef": policy,
            "backup": "latest",
            "target": verification.target.to_api(),
            # A scratch copy checks contents: it need not exist on a server with the source's roles, and the
            # application's roles get no access to it.
            "roles": {"owners": "Skip", "privileges": "Skip"},
            **(
                {"decryptionSecretRef": verification.decryption_secret_ref.to_api()}
                if verification.decryption_secret_ref is not None
                else {}
            ),
        },
    }
