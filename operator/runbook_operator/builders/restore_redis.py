"""A Redis backup's restore: its plan and the Job that runs ``runbook-operator restore-redis``, as pure
functions. The pod gets a memory-backed scratch volume sized from the manifest (the decrypted RDB is only
ever there), and a memory limit that holds the RDB plus the scratch server's dataset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..models.backup import BackupPolicySpec, BackupRestoreSpec
from ..models.plans import REDIS_PASSWORD_ENV, SCRATCH_DIR_ENV, RedisRestorePlan
from ..models.sources import RedisConnection
from .backup import AGENT_RESOURCES, agent_pod_spec, redis_tls_files, secret_env
from .restore import CONTAINER, job_name, plan_env, restore_job

SCRATCH_DIR = "/scratch"
_MI = 1024 * 1024
# The scratch server's dataset in memory is a few times the RDB (which is compact: listpacks, integers, LZF);
# the tmpfs copy is freed once loaded. Measured: 100k mixed keys (with TTLs, two dbs), a 5.1 MB RDB, a 19.7 MB
# used_memory_peak of the scratch server (3.9x).
DATASET_FACTOR = 8
_HEADROOM = 256 * _MI  # the agent, gpg, redis-server itself


def build_redis_plan(
    policy: BackupPolicySpec, manifest: Mapping[str, Any], target: RedisConnection, *, etag: str | None = None
) -> RedisRestorePlan:
    """What the Job needs: the backup's object from the manifest (carried as read) and the preflight's ETag."""
    data = manifest["data"]
    return RedisRestorePlan(
        location=policy.destination.s3,
        key=data["key"],
        sha256=data["sha256"],
        size_bytes=data["sizeBytes"],
        symmetric=(manifest.get("encryption") or {}).get("mode") == "symmetric",
        keyspace={str(db): int(n) for db, n in ((manifest.get("source") or {}).get("keyspace") or {}).items()},
        target=target,
        manifest=dict(manifest),
        etag=etag,
    )


def _mebibytes(size: int) -> str:
    return f"{-(-size // _MI)}Mi"


def scratch_sizes(size_bytes: int) -> tuple[str, str]:
    """(the scratch volume's sizeLimit, the container's memory) for an RDB of this size."""
    volume = size_bytes + 16 * _MI  # the plaintext is at most the ciphertext (no compression) plus slack
    memory = _HEADROOM + volume + DATASET_FACTOR * size_bytes
    return _mebibytes(volume), _mebibytes(memory)


def build_redis_job(
    body: Mapping[str, Any],
    plan: RedisRestorePlan,
    *,
    policy: BackupPolicySpec,
    spec: BackupRestoreSpec,
    image: str,
) -> dict[str, Any]:
    """The Job that runs ``runbook-operator restore-redis`` once (no retries: a restore is not repeated blindly)."""
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    target = plan.target
    env: list[dict[str, Any]] = [
        *plan_env(plan, policy=policy, spec=spec),
        {"name": SCRATCH_DIR_ENV, "value": SCRATCH_DIR},
    ]
    if target.password_secret_ref is not None:
        env.append(secret_env(REDIS_PASSWORD_ENV, target.password_secret_ref.name, target.password_secret_ref.key))
    volume_size, memory = scratch_sizes(plan.size_bytes)
    volumes: list[dict[str, Any]] = [{"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": volume_size}}]
    mounts: list[dict[str, Any]] = [{"name": "scratch", "mountPath": SCRATCH_DIR}]
    tls_env, tls_volumes, tls_mounts = redis_tls_files(target.tls)
    env += tls_env
    volumes += tls_volumes
    mounts += tls_mounts
    pod = agent_pod_spec(
        container=CONTAINER,
        image=image,
        args=["restore-redis", "--namespace", namespace, "--name", name],
        env=env,
        volumes=volumes,
        mounts=mounts,
    )
    pod["containers"][0]["resources"] = {
        "requests": {**AGENT_RESOURCES["requests"], "memory": memory},
        "limits": {**AGENT_RESOURCES["limits"], "memory": memory},
    }
    return restore_job(body, name=job_name(name), component="restore", pod=pod, deadline=policy.active_deadline_seconds)
