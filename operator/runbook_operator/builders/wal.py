"""BackupPolicy spec.wal manifests: the owned receiver Deployment ``<policy>-wal`` (``runbook-operator
wal-receive``: streams WAL through the policy's slot into memory, every segment through gpg to the bucket) and
the owned CronJob ``<policy>-base`` (``runbook-operator base-backup``: pg_basebackup through gpg). Both pods are the
backup agent's hardened pod (``builders.backup.agent_pod_spec``) with the agent's environment
(``builders.backup.agent_env``), except that the login is the replication one and the spec travels in
``RUNBOOK_WAL_SPEC``. Pure: no I/O."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..models.backup import BackupPolicySpec, WALArchiving
from ..models.plans import JOB_NAME_ENV, SPEC_ENV, WAL_SCRATCH_ENV, WAL_SPEC_ENV
from ..settings import MANAGED_BY
from .backup import POLICY_LABEL, agent_env, agent_pod_spec, policy_owner, postgres_tls_files

RECEIVER_CONTAINER = "wal-receive"
BASE_BACKUP_CONTAINER = "base-backup"
RECEIVER_COMPONENT = "wal-receiver"
BASE_BACKUP_COMPONENT = "base-backup"
SCRATCH_DIR = "/var/lib/runbook/wal"
# RUNBOOK_WAL_SCRATCH must name a directory, but the receiver holds WAL in memory and writes nothing there;
# memory-backed (tmpfs) and small, so nothing written there by mistake reaches a node's disk.
SCRATCH_SIZE_LIMIT = "1Mi"
# Measured by bench/wal_rpo.py (2026-12-02, machine load 4-6, 2601 commits/s, 1.02 MiB/s of WAL): the receiver
# and its gpg peak at 116.6 MiB RSS together (the receiver's VmHWM 111.6 MiB: the segment being received and
# the one being shipped, 16 MiB each, the 8 MiB upload part, boto3 and psycopg; gpg 5.1 MiB). Two segments
# are its bound whatever the load or an S3 outage. tmpfs pages (/tmp 16Mi, the scratch 1Mi) count in the
# container's memory too: the request is that sum with ~30% headroom, the limit about twice it; one core at
# most (gpg, TLS, hashing).
RECEIVER_PEAK_RSS = "117Mi"
RECEIVER_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "100m", "memory": "176Mi", "ephemeral-storage": "16Mi"},
    "limits": {"cpu": "1", "memory": "256Mi", "ephemeral-storage": "64Mi"},
}
# SIGTERM: the receiver ships what it holds (a complete segment not yet in the bucket and the partial) before
# it exits, so a pod's deletion loses nothing already received; a slow bucket gets this long.
RECEIVER_GRACE_SECONDS = 60
_MAX_NAME = 52  # the CronJob controller appends 11 characters to its Jobs' names; the Deployment's pods ~17


def _child_name(policy: str, suffix: str) -> str:
    """``<policy>-<suffix>``, shortened with a hash of the policy's name when it is long."""
    name = f"{policy}-{suffix}"
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(policy.encode()).hexdigest()[:8]
    keep = _MAX_NAME - len(suffix) - 10
    return f"{policy[:keep].rstrip('-.')}-{digest}-{suffix}"


def receiver_name(policy: str) -> str:
    """The receiver Deployment: ``<policy>-wal``."""
    return _child_name(policy, "wal")


def base_backup_cronjob_name(policy: str) -> str:
    """The base-backup CronJob: ``<policy>-base``."""
    return _child_name(policy, "base")


def wal_labels(policy: str, component: str) -> dict[str, str]:
    return {**MANAGED_BY, POLICY_LABEL: policy, "app.kubernetes.io/component": component}


def _wal(spec: BackupPolicySpec) -> WALArchiving:
    if spec.wal is None or spec.source.postgresql is None:
        raise ValueError("spec.wal: the policy does not archive WAL")
    return spec.wal


def wal_agent_env(spec: BackupPolicySpec, *, job_name_field: str) -> list[dict[str, Any]]:
    """The backup agent's environment (``agent_env``: S3 keys, gpg, the manifest key, TLS) with the replication
    login (spec.wal.replicationCredentialsSecretRef) as PGUSER/PGPASSWORD, the spec in ``RUNBOOK_WAL_SPEC`` and
    ``RUNBOOK_JOB_NAME`` from ``job_name_field`` (a field of the pod, by the downward API)."""
    wal = _wal(spec)
    source = spec.source.postgresql
    assert source is not None
    as_replication = spec.model_copy(
        update={
            "source": spec.source.model_copy(
                update={
                    "postgresql": source.model_copy(
                        update={"credentials_secret_ref": wal.replication_credentials_secret_ref}
                    )
                }
            )
        }
    )
    replaced: dict[str, dict[str, Any]] = {
        SPEC_ENV: {"name": WAL_SPEC_ENV, "value": json.dumps(spec.to_api(), sort_keys=True, separators=(",", ":"))},
        JOB_NAME_ENV: {"name": JOB_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": job_name_field}}},
    }
    return [replaced.get(item["name"], item) for item in agent_env(as_replication)]


def _tls_parts(spec: BackupPolicySpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    source = spec.source.postgresql
    _, volumes, mounts = postgres_tls_files(source.tls if source is not None else None)
    return volumes, mounts


def build_receiver(spec: BackupPolicySpec, *, namespace: str, policy: str, uid: str, image: str) -> dict[str, Any]:
    """The owned receiver Deployment: one replica (two receivers on one slot would be refused by the server),
    Recreate (the old pod has left the slot before the new one starts), 0 replicas when spec.wal.enabled is
    false. The scratch directory is a memory-backed emptyDir with a size limit."""
    wal = _wal(spec)
    labels = wal_labels(policy, RECEIVER_COMPONENT)
    volumes, mounts = _tls_parts(spec)
    env = wal_agent_env(spec, job_name_field="metadata.name")
    env.append({"name": WAL_SCRATCH_ENV, "value": SCRATCH_DIR})
    pod = agent_pod_spec(
        container=RECEIVER_CONTAINER,
        image=image,
        args=["wal-receive", "--namespace", namespace, "--policy", policy],
        env=env,
        volumes=[{"name": "wal", "emptyDir": {"medium": "Memory", "sizeLimit": SCRATCH_SIZE_LIMIT}}, *volumes],
        mounts=[{"name": "wal", "mountPath": SCRATCH_DIR}, *mounts],
    )
    pod["restartPolicy"] = "Always"  # a Deployment's pods restart in place (the scratch directory survives that)
    pod["terminationGracePeriodSeconds"] = RECEIVER_GRACE_SECONDS
    pod["containers"][0]["resources"] = RECEIVER_RESOURCES
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": receiver_name(policy),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [policy_owner(policy, uid)],
        },
        "spec": {
            "replicas": 1 if wal.enabled else 0,
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": {POLICY_LABEL: policy, "app.kubernetes.io/component": RECEIVER_COMPONENT}},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def build_base_backup_cronjob(
    spec: BackupPolicySpec, *, namespace: str, policy: str, uid: str, image: str
) -> dict[str, Any]:
    """The owned CronJob taking base backups on spec.wal.baseBackups.schedule (the policy's schedule when
    absent); suspended with the policy, or while spec.wal.enabled is false."""
    wal = _wal(spec)
    labels = wal_labels(policy, BASE_BACKUP_COMPONENT)
    volumes, mounts = _tls_parts(spec)
    pod = agent_pod_spec(
        container=BASE_BACKUP_CONTAINER,
        image=image,
        args=["base-backup", "--namespace", namespace, "--policy", policy],
        env=wal_agent_env(spec, job_name_field="metadata.labels['batch.kubernetes.io/job-name']"),
        volumes=volumes,
        mounts=mounts,
    )
    schedule = wal.base_backups.schedule or spec.schedule
    time_zone = wal.base_backups.time_zone if wal.base_backups.schedule else spec.time_zone
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {
            "name": base_backup_cronjob_name(policy),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [policy_owner(policy, uid)],
        },
        "spec": {
            "schedule": schedule,
            "timeZone": time_zone,
            "suspend": spec.suspend or not wal.enabled,
            "concurrencyPolicy": "Forbid",  # two base backups at once only load the server twice
            "startingDeadlineSeconds": spec.starting_deadline_seconds,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": labels},
                "spec": {
                    "backoffLimit": spec.backoff_limit,
                    "activeDeadlineSeconds": spec.active_deadline_seconds,
                    "template": {"metadata": {"labels": labels}, "spec": pod},
                },
            },
        },
    }
