"""BackupPolicy manifests: the owned CronJob that runs the agent (for a Kubernetes export, as the
ServiceAccount an administrator created when enabling the namespace). Pure: no I/O."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..models import GROUP, VERSION
from ..models.backup import BACKUP_NOW, BackupPolicySpec
from ..models.plans import (
    GPG_PASSPHRASE_ENV,
    GPG_RECIPIENTS_ENV,
    JOB_NAME_ENV,
    MANIFEST_KEY_ENV,
    MANIFEST_KEY_SECRET,
    MANIFEST_KEY_SECRET_KEY,
    PG_CA_FILE_ENV,
    PG_PASSWORD_ENV,
    PG_USER_ENV,
    REDIS_CA_FILE_ENV,
    REDIS_CERT_FILE_ENV,
    REDIS_KEY_FILE_ENV,
    REDIS_PASSWORD_ENV,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
    SPEC_ENV,
)
from ..models.sources import TLS_CERT_KEY, TLS_KEY_KEY, PostgresTLS, RedisTLS
from ..settings import MANAGED_BY, PREFIX
from .common import owner_reference

POLICY_LABEL = f"{PREFIX}/backup-policy"
CONTAINER = "backup"
AGENT_UID = 10001  # the image's non-root user
REDIS_CA_DIR = "/etc/runbook/redis-ca"
POSTGRES_CA_DIR = "/etc/runbook/postgres-ca"
REDIS_CLIENT_DIR = "/etc/runbook/redis-client"
# gpg needs a home for its keyring and agent socket; a small memory-backed /tmp is the only writable path.
# It is far too small to hold a dump: the data only ever streams through pipes.
TMP_SIZE_LIMIT = "16Mi"
TMP_DIR = "/tmp"  # noqa: S108 - the pod's own memory-backed volume
# The agent streams (backup: 83-86 MiB summed PSS with pg_dump and gpg, flat across dump sizes; bench/), so
# memory is bounded; one core is as much as pg_dump | gpg use; the root filesystem is read-only and /tmp is
# memory, so the node's disk holds only the container's log (ephemeral storage).
AGENT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "100m", "memory": "128Mi", "ephemeral-storage": "16Mi"},
    "limits": {"cpu": "1", "memory": "256Mi", "ephemeral-storage": "64Mi"},
}
_MAX_CRONJOB_NAME = 52  # the CronJob controller appends an 11-character suffix to name its Jobs
# A Kubernetes export's pods run as one of these, created with the namespace's enabling bundle
# (deploy/base/namespace-enable/): read access to the exportable resources, Secrets for the second only.
EXPORT_SERVICE_ACCOUNT = "runbook-export"
EXPORT_SECRETS_SERVICE_ACCOUNT = "runbook-export-secrets"


def cronjob_name(policy: str) -> str:
    """``backup-<policy>``, shortened with a hash when the policy's name is long."""
    name = f"backup-{policy}"
    if len(name) <= _MAX_CRONJOB_NAME:
        return name
    digest = hashlib.sha256(policy.encode()).hexdigest()[:8]
    return f"{name[: _MAX_CRONJOB_NAME - 9].rstrip('-.')}-{digest}"


def export_service_account(spec: BackupPolicySpec) -> str | None:
    """The ServiceAccount a Kubernetes export's pods run as (None: other sources mount no token)."""
    source = spec.source.kubernetes
    if source is None:
        return None
    return EXPORT_SECRETS_SERVICE_ACCOUNT if source.include_secrets else EXPORT_SERVICE_ACCOUNT


def labels(policy: str) -> dict[str, str]:
    return {**MANAGED_BY, POLICY_LABEL: policy, "app.kubernetes.io/component": "backup"}


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def agent_env(spec: BackupPolicySpec) -> list[dict[str, Any]]:
    """The agent's environment: the spec (references only) and every credential as a Secret reference."""
    env: list[dict[str, Any]] = [
        {"name": SPEC_ENV, "value": json.dumps(spec.to_api(), sort_keys=True, separators=(",", ":"))},
        {
            "name": JOB_NAME_ENV,
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}},
        },
        {"name": "HOME", "value": TMP_DIR},
        # The namespace's manifest signing key: the agent signs each manifest (restores and drills verify it).
        secret_env(MANIFEST_KEY_ENV, MANIFEST_KEY_SECRET, MANIFEST_KEY_SECRET_KEY),
    ]
    source = spec.source
    if source.postgresql is not None:
        ref = source.postgresql.credentials_secret_ref
        env += [
            secret_env(PG_USER_ENV, ref.name, ref.username_key),
            secret_env(PG_PASSWORD_ENV, ref.name, ref.password_key),
        ]
        env += postgres_tls_files(source.postgresql.tls)[0]
    if source.redis is not None:
        if source.redis.password_secret_ref is not None:
            ref_key = source.redis.password_secret_ref
            env.append(secret_env(REDIS_PASSWORD_ENV, ref_key.name, ref_key.key))
        env += redis_tls_files(source.redis.tls)[0]
    s3 = spec.destination.s3.credentials_secret_ref
    if s3 is not None:
        env += [
            secret_env(S3_ACCESS_KEY_ENV, s3.name, s3.access_key_id_key),
            secret_env(S3_SECRET_KEY_ENV, s3.name, s3.secret_access_key_key),
        ]
    gpg = spec.encryption.gpg
    if gpg.recipients_config_map_ref is not None:
        ref_cm = gpg.recipients_config_map_ref
        env.append(
            {"name": GPG_RECIPIENTS_ENV, "valueFrom": {"configMapKeyRef": {"name": ref_cm.name, "key": ref_cm.key}}}
        )
    if gpg.passphrase_secret_ref is not None:
        env.append(secret_env(GPG_PASSPHRASE_ENV, gpg.passphrase_secret_ref.name, gpg.passphrase_secret_ref.key))
    return env


def build_manifest_key(namespace: str, value: str) -> dict[str, Any]:
    """The namespace's manifest signing key (created once, never overwritten; no owner, so it outlives every
    policy and the backups it signed stay restorable)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": MANIFEST_KEY_SECRET, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "type": "Opaque",
        "data": {MANIFEST_KEY_SECRET_KEY: base64.b64encode(value.encode()).decode()},
    }


def agent_pod_spec(
    *,
    container: str,
    image: str,
    args: list[str],
    env: list[dict[str, Any]],
    volumes: Sequence[dict[str, Any]] = (),
    mounts: Sequence[dict[str, Any]] = (),
    service_account: str | None = None,
) -> dict[str, Any]:
    """The hardened pod that runs the agent once: non-root, read-only root filesystem, no capabilities, and
    nothing writable but a small memory-backed /tmp for gpg's home (too small to hold a dump)."""
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": service_account is not None,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": AGENT_UID,
            "runAsGroup": AGENT_UID,
            "fsGroup": AGENT_UID,  # Secret volume files belong to this group: a key readable by the agent only
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": container,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "args": args,
                "env": env,
                "resources": AGENT_RESOURCES,
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": "tmp", "mountPath": TMP_DIR}, *mounts],
                # The agent's last line is its one-line failure reason; the operator reads it from here.
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": TMP_SIZE_LIMIT}}, *volumes],
    }
    if service_account is not None:
        pod["serviceAccountName"] = service_account
    return pod


Parts = list[dict[str, Any]]


def redis_tls_files(tls: RedisTLS | None) -> tuple[Parts, Parts, Parts]:
    """(env, volumes, mounts) that give an agent a Redis connection's CA and client pair as files of Secret
    volumes (the backup's source, a restore's target)."""
    env: Parts = []
    volumes: Parts = []
    mounts: Parts = []
    if tls is not None and tls.ca_secret_ref is not None:
        ca = tls.ca_secret_ref
        env.append({"name": REDIS_CA_FILE_ENV, "value": f"{REDIS_CA_DIR}/ca.crt"})
        volumes.append(
            {"name": "redis-ca", "secret": {"secretName": ca.name, "items": [{"key": ca.key, "path": "ca.crt"}]}}
        )
        mounts.append({"name": "redis-ca", "mountPath": REDIS_CA_DIR, "readOnly": True})
    if tls is not None and tls.client_certificate_secret_ref is not None:
        env += [
            {"name": REDIS_CERT_FILE_ENV, "value": f"{REDIS_CLIENT_DIR}/{TLS_CERT_KEY}"},
            {"name": REDIS_KEY_FILE_ENV, "value": f"{REDIS_CLIENT_DIR}/{TLS_KEY_KEY}"},
        ]
        items = [
            {"key": TLS_CERT_KEY, "path": TLS_CERT_KEY},
            {"key": TLS_KEY_KEY, "path": TLS_KEY_KEY, "mode": 0o440},  # owner root, group fsGroup
        ]
        name = tls.client_certificate_secret_ref.name
        volumes.append({"name": "redis-client", "secret": {"secretName": name, "items": items, "defaultMode": 0o444}})
        mounts.append({"name": "redis-client", "mountPath": REDIS_CLIENT_DIR, "readOnly": True})
    return env, volumes, mounts


def postgres_tls_files(tls: PostgresTLS | None) -> tuple[Parts, Parts, Parts]:
    """(env, volumes, mounts) that give an agent a PostgreSQL connection's CA as a file of a Secret volume, and
    libpq's settings for every client in the pod (pg_dump, pg_restore, psql, the agent's own connections):
    verify-full against that CA, SCRAM-SHA-256 only, no GSSAPI encryption. Nothing without TLS."""
    if tls is None:
        return [], [], []
    ca = tls.ca_secret_ref
    env: Parts = [
        {"name": "PGSSLMODE", "value": "verify-full"},
        {"name": PG_CA_FILE_ENV, "value": f"{POSTGRES_CA_DIR}/ca.crt"},
        {"name": "PGREQUIREAUTH", "value": "scram-sha-256"},
        {"name": "PGGSSENCMODE", "value": "disable"},
    ]
    volumes: Parts = [
        {"name": "postgres-ca", "secret": {"secretName": ca.name, "items": [{"key": ca.key, "path": "ca.crt"}]}}
    ]
    mounts: Parts = [{"name": "postgres-ca", "mountPath": POSTGRES_CA_DIR, "readOnly": True}]
    return env, volumes, mounts


def _pod_spec(spec: BackupPolicySpec, *, namespace: str, policy: str, generation: int, image: str) -> dict[str, Any]:
    redis, postgresql = spec.source.redis, spec.source.postgresql
    _, volumes, mounts = redis_tls_files(redis.tls if redis is not None else None)
    _, pg_volumes, pg_mounts = postgres_tls_files(postgresql.tls if postgresql is not None else None)
    volumes, mounts = [*volumes, *pg_volumes], [*mounts, *pg_mounts]
    return agent_pod_spec(
        container=CONTAINER,
        image=image,
        args=["backup", "--namespace", namespace, "--policy", policy, "--generation", str(generation)],
        env=agent_env(spec),
        volumes=volumes,
        mounts=mounts,
        service_account=export_service_account(spec),
    )


def build_job_spec(
    spec: BackupPolicySpec, *, namespace: str, policy: str, generation: int, image: str
) -> dict[str, Any]:
    """The spec of one backup Job (the CronJob's template, and a backup-now Job)."""
    return {
        "backoffLimit": spec.backoff_limit,
        "activeDeadlineSeconds": spec.active_deadline_seconds,
        "template": {
            "metadata": {"labels": labels(policy)},
            "spec": _pod_spec(spec, namespace=namespace, policy=policy, generation=generation, image=image),
        },
    }


def policy_owner(policy: str, uid: str) -> dict[str, Any]:
    """The owner reference to the BackupPolicy ``policy`` (its ``uid``)."""
    return owner_reference(
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BackupPolicy", "metadata": {"name": policy, "uid": uid}}
    )


def build_cronjob(
    spec: BackupPolicySpec, *, namespace: str, policy: str, uid: str, generation: int, image: str
) -> dict[str, Any]:
    """The owned CronJob that runs the agent on the policy's schedule."""
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {
            "name": cronjob_name(policy),
            "namespace": namespace,
            "labels": labels(policy),
            "ownerReferences": [policy_owner(policy, uid)],
        },
        "spec": {
            "schedule": spec.schedule,
            "timeZone": spec.time_zone,
            "suspend": spec.suspend,
            "concurrencyPolicy": spec.concurrency_policy,
            # A run missed by more than this is skipped, so after an outage at most one catch-up run starts.
            "startingDeadlineSeconds": spec.starting_deadline_seconds,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": labels(policy)},
                "spec": build_job_spec(spec, namespace=namespace, policy=policy, generation=generation, image=image),
            },
        },
    }


def build_backup_now_job(cronjob: Mapping[str, Any], token: str) -> dict[str, Any]:
    """A Job from the CronJob's template (as ``kubectl create job --from=cronjob/...``), owned by the CronJob
    so the Job watcher counts it like a scheduled run; its name is derived from the annotation's value."""
    metadata = cronjob["metadata"]
    digest = hashlib.sha256(token.encode()).hexdigest()[:6]
    template = cronjob["spec"]["jobTemplate"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{metadata['name']}-now-{digest}",
            "namespace": metadata["namespace"],
            "labels": dict(template["metadata"]["labels"]),
            "annotations": {BACKUP_NOW: token[:253]},
            "ownerReferences": [owner_reference(cronjob)],
        },
        "spec": template["spec"],
    }
