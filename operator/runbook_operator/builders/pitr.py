"""A point-in-time BackupRestore's manifests, as pure functions: the plan its Job reads (from the WAL catalog's
choice), the Job that runs ``runbook-operator restore-pitr`` on the data directory's volume, and the new
PersistentVolumeClaim of ``mode: NewVolume``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..models.backup import BackupPolicySpec, BackupRestoreSpec, NewVolume, PointInTime
from ..models.plans import PGDATA_ROOT_ENV, PITR_PLAN_ENV, SCRATCH_DIR_ENV, PointInTimePlan
from ..settings import MANAGED_BY
from .backup import TMP_DIR, agent_pod_spec
from .restore import CONTAINER, RESTORE_LABEL, job_name, restore_job, storage_env

if TYPE_CHECKING:
    from ..reconcilers.wal_catalog import Choice

PGDATA_ROOT = "/var/lib/runbook/volume"  # where the Job mounts the claim
SCRATCH = "/var/lib/runbook/scratch"  # the encrypted objects, downloaded before anything is written
SCRATCH_VOLUME, DATA_VOLUME = "scratch", "data"


def default_claim(point: PointInTime) -> str:
    """The claim of an InPlace restore: ``volumeClaim``, else the StatefulSet's first pod's ``data-<sts>-0``."""
    return point.volume_claim or f"data-{point.stateful_set}-0"


def claim_name(point: PointInTime) -> str:
    if point.mode == "NewVolume":
        assert point.new_volume is not None  # the model's validator
        return point.new_volume.name
    return default_claim(point)


def keep_previous_as(point: PointInTime, restore: str) -> str | None:
    """InPlace: the replaced data directory is kept beside it, named after the restore."""
    if point.mode != "InPlace":
        return None
    return f"{point.data_directory}.before-{restore}"


def build_pitr_plan(
    policy: BackupPolicySpec, choice: Choice, point: PointInTime, *, restore: str, namespace: str, policy_name: str
) -> PointInTimePlan:
    """The Job's plan: the chosen base backup with its manifest as the preflight read it, and the range of WAL
    after it (the Job reads and verifies each file's manifest itself)."""
    return PointInTimePlan(
        location=policy.destination.s3,
        base_key=choice.base.key,
        base_manifest=dict(choice.base.manifest),
        wal=choice.wal_range(namespace=namespace, policy=policy_name),
        data_directory=point.data_directory,
        keep_previous_as=keep_previous_as(point, restore),
        target_time=choice.target if point.target_time is not None else None,
        target_lsn=choice.target if point.target_lsn is not None else None,
        timeline=choice.timeline,
    )


def build_claim(body: Mapping[str, Any], volume: NewVolume) -> dict[str, Any]:
    """The new claim: not owned by the BackupRestore (deleting the restore leaves the recovered data)."""
    metadata = body["metadata"]
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": volume.size}},
    }
    if volume.storage_class_name is not None:
        spec["storageClassName"] = volume.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": volume.name,
            "namespace": metadata["namespace"],
            "labels": {**MANAGED_BY, RESTORE_LABEL: metadata["name"]},
        },
        "spec": spec,
    }


def run_as(stateful_set: Mapping[str, Any] | None) -> dict[str, int]:
    """The user, group and fsGroup of the StatefulSet's pods (their pod securityContext, else their first
    container's), which must own the data directory the Job writes; empty when they set none."""
    if stateful_set is None:
        return {}
    pod = ((stateful_set.get("spec") or {}).get("template") or {}).get("spec") or {}
    containers = pod.get("containers") or [{}]
    found: dict[str, int] = {}
    for context in (containers[0].get("securityContext") or {}, pod.get("securityContext") or {}):
        for name in ("runAsUser", "runAsGroup", "fsGroup"):
            value = context.get(name)
            if isinstance(value, int) and name not in found:
                found[name] = value
    return found


def build_pitr_job(
    body: Mapping[str, Any],
    plan: PointInTimePlan,
    *,
    policy: BackupPolicySpec,
    spec: BackupRestoreSpec,
    claim: str,
    image: str,
    identity: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The Job that runs ``runbook-operator restore-pitr`` once, the claim mounted at ``PGDATA_ROOT`` and a
    disk-backed scratch directory for the (encrypted) objects; run as ``identity`` (``run_as`` of the
    StatefulSet) when given, so the server can read what it writes (a non-root user only)."""
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    env = [
        {"name": PITR_PLAN_ENV, "value": json.dumps(plan.to_api(), sort_keys=True, separators=(",", ":"))},
        {"name": PGDATA_ROOT_ENV, "value": PGDATA_ROOT},
        {"name": SCRATCH_DIR_ENV, "value": SCRATCH},
        {"name": "HOME", "value": TMP_DIR},
        *storage_env(
            policy=policy, spec=spec, symmetric=bool(plan.base_manifest.get("symmetric")), manifest=plan.base_manifest
        ),
    ]
    pod = agent_pod_spec(
        container=CONTAINER,
        image=image,
        args=["restore-pitr", "--namespace", namespace, "--name", name],
        env=env,
        volumes=[
            {"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": claim}},
            {"name": SCRATCH_VOLUME, "emptyDir": {}},
        ],
        mounts=[
            {"name": DATA_VOLUME, "mountPath": PGDATA_ROOT},
            {"name": SCRATCH_VOLUME, "mountPath": SCRATCH},
        ],
    )
    user = (identity or {}).get("runAsUser")
    if user:  # never root: a StatefulSet running as root gets the agent's own user
        context = pod["securityContext"]
        context["runAsUser"] = user
        context["runAsGroup"] = (identity or {}).get("runAsGroup", user)
        context["fsGroup"] = (identity or {}).get("fsGroup", context["runAsGroup"])
    return restore_job(
        body, name=job_name(name), component="restore-pitr", pod=pod, deadline=policy.active_deadline_seconds
    )
