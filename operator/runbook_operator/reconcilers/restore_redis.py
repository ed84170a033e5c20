"""BackupRestore of a Redis backup: the PostgreSQL restore's five steps, with Redis's own Preflight, Job and
Check (ScaleDown and ScaleUp are the shared ones: the writers are stopped and brought back at their exact
recorded counts).

- **Preflight** (in the operator, read-only): the spec must suit a Redis backup (only ``target.redis``, no
  PostgreSQL fields), the manifest must be a Redis backup's, the target must accept the login, and the whole
  object is streamed through gpg (SHA-256, full decryption, an RDB file). ``dryRun`` ends here.
- **Restoring**: the Job loads the RDB into a scratch redis-server in its memory-backed volume, checks it
  against the manifest's keyspace, then FLUSHALL of the target and every key copied (DUMP/RESTORE with its
  TTL), and compares sampled keys; its summary (termination message) carries the figures.
- **Checking**: the target's keys per db, counted here, against the Job's summary and the manifest: equal,
  less only keys whose TTL ran out since.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubernetes.client import ApiException

from ..agent.restore_redis import connect_target, keyspace, verify_redis, where
from ..builders.restore import job_name
from ..builders.restore_redis import build_redis_job, build_redis_plan
from ..clients import kube
from ..clients.redis import TLS_CERT_KEY, TLS_KEY_KEY, TLSMaterial
from ..errors import RunbookError
from ..models.backup import BackupPolicySpec, BackupRestoreSpec
from ..models.plans import REDIS_PASSWORD_ENV, RedisRestorePlan
from ..models.sources import RedisConnection
from ..settings import FIELD_MANAGER
from .base import parse_spec
from .jobs import failure_reason, job_outcome, job_pods, job_summary, read_job

if TYPE_CHECKING:
    from .restore import Restore

_FIELD = "spec.target.redis"


class RedisSteps:
    """The steps of one BackupRestore whose policy backs up a Redis."""

    def __init__(self, restore: Restore) -> None:
        self.restore = restore

    def advance(self, phase: str) -> float | None:
        from .restore import CHECKING, PREFLIGHT, RESTORING, SCALING_DOWN, SCALING_UP, TERMINAL

        restore = self.restore
        if phase == PREFLIGHT:
            self.preflight()
        elif phase == SCALING_DOWN:
            return restore.scale_down()
        elif phase == RESTORING:
            return self.watch_job()
        elif phase == CHECKING:
            self.check()
        elif phase == SCALING_UP:
            return restore.scale_up()
        return None if restore.status.get("phase") in TERMINAL else 0

    # --- what the spec refers to -----------------------------------------------------------------------

    def plan(self) -> tuple[BackupRestoreSpec, BackupPolicySpec, RedisRestorePlan, dict[str, Any]]:
        restore = self.restore
        spec = parse_spec(BackupRestoreSpec, restore.body.get("spec"))
        policy = restore.policy_spec(spec)
        source = policy.source.redis
        assert source is not None  # dispatched on it
        if spec.target is not None and spec.target.postgresql_fields:
            raise RunbookError(
                "TargetMismatch",
                f"spec.target.{spec.target.postgresql_fields[0]}: BackupPolicy {spec.policy_ref} backs up Redis; a "
                f"Redis backup is restored into a Redis ({_FIELD}), not a PostgreSQL database",
            )
        if policy.encryption.gpg.passphrase_secret_ref is None and spec.decryption_secret_ref is None:
            raise RunbookError(
                "DecryptionKeyMissing",
                f"spec.decryptionSecretRef: BackupPolicy {spec.policy_ref} encrypts to public keys; name the Secret "
                "key holding the private key",
            )
        scratch = spec.target.redis if spec.target is not None else None
        target = scratch.resolve(source) if scratch is not None else source
        manifest = restore.stored_manifest(spec, policy)
        return spec, policy, build_redis_plan(policy, manifest, target), manifest

    def credentials(self, spec: BackupRestoreSpec, policy: BackupPolicySpec, target: RedisConnection) -> dict[str, str]:
        env = self.restore.storage_credentials(spec, policy)
        if target.password_secret_ref is not None:
            ref = target.password_secret_ref
            env[REDIS_PASSWORD_ENV] = kube.read_secret_value(
                self.restore.namespace, ref.name, ref.key, field=f"{_FIELD}.passwordSecretRef"
            )
        return env

    def material(self, target: RedisConnection) -> TLSMaterial | None:
        """The target's TLS PEM texts, read from its Secrets (the Job mounts the same Secrets)."""
        tls = target.tls
        if tls is None or not tls.enabled:
            return None
        namespace = self.restore.namespace
        ca = certificate = key = None
        if tls.ca_secret_ref is not None:
            ref = tls.ca_secret_ref
            ca = kube.read_secret_value(namespace, ref.name, ref.key, field=f"{_FIELD}.tls.caSecretRef")
        if tls.client_certificate_secret_ref is not None:
            name, field = tls.client_certificate_secret_ref.name, f"{_FIELD}.tls.clientCertificateSecretRef"
            certificate = kube.read_secret_value(namespace, name, TLS_CERT_KEY, field=field)
            key = kube.read_secret_value(namespace, name, TLS_KEY_KEY, field=field)
        return TLSMaterial(ca=ca, certificate=certificate, key=key)

    # --- the steps -------------------------------------------------------------------------------------

    def preflight(self) -> None:
        from .restore import DRY_RUN, FAILED, SCALING_DOWN

        restore = self.restore
        try:
            spec, policy, plan, manifest = self.plan()
            restore.status.set(backupKey=plan.key, backupTime=manifest.get("endTime"), target=where(plan.target))
            for index, ref in enumerate(spec.scale_down):
                if restore.workload(ref.kind, ref.name) is None:
                    raise RunbookError("WorkloadNotFound", f"spec.scaleDown[{index}]: {ref.kind} {ref.name} not found")
            env = self.credentials(spec, policy, plan.target)
            connect_target(plan.target, env, self.material(plan.target)).close()
            figures = verify_redis(plan, env)
        except RunbookError as error:
            restore.end("Preflight", "Failed", f"{error.reason}: {error.message}")
            restore.finish(FAILED, error)
            return
        restore.status.set(checks={**(restore.status.get("checks") or {}), **figures})
        message = (
            f"{plan.key}: SHA-256 matches the manifest ({plan.size_bytes} bytes), decrypts to an RDB file (version "
            f"{figures['rdbVersion']}) of {sum(plan.keyspace.values())} keys; target {where(plan.target)} reachable"
        )
        restore.end("Preflight", "Succeeded", message)
        restore.event("PreflightPassed", message)
        if spec.dry_run:
            restore.finish(DRY_RUN)
            return
        restore.begin("ScaleDown", SCALING_DOWN)
        restore.flush()

    def watch_job(self) -> float:
        from .restore import CHECKING, POLL_SECONDS, RESTORE_FAILURE_PREFIX

        restore = self.restore
        name = job_name(restore.name)
        job = read_job(kube.KubeApi(), restore.namespace, name)
        if job is None:
            if restore.status.get("jobName"):
                restore.fail_midway("Restore", RunbookError("JobMissing", f"Job {name} was deleted before it finished"))
                return 0
            return self.create_job()
        outcome = job_outcome(job)
        if outcome is None:
            return POLL_SECONDS
        pods = job_pods(kube.KubeApi(), restore.namespace, name)
        if outcome[0] != "Complete":
            reason, message = failure_reason(job, pods, prefix=RESTORE_FAILURE_PREFIX)
            restore.fail_midway("Restore", RunbookError(reason, f"Job {name}: {message}"))
            return 0
        summary = job_summary(pods, "redis") or {}
        figures = {k: summary[k] for k in ("expiredSinceBackup", "sampledKeys") if isinstance(summary.get(k), int)}
        restore.status.set(checks={**(restore.status.get("checks") or {}), **figures})
        restore.end(
            "Restore",
            "Succeeded",
            f"Job {name} loaded {restore.status.get('backupKey')} into a scratch server and copied "
            f"{summary.get('keys', '?')} keys into {restore.status.get('target')} (FLUSHALL first); "
            f"{summary.get('sampledKeys', '?')} sampled keys equal",
        )
        restore.begin("Check", CHECKING)
        restore.flush()
        return 0

    def create_job(self) -> float:
        from .restore import POLL_SECONDS

        restore = self.restore
        try:
            spec, policy, plan, _ = self.plan()
        except RunbookError as error:
            restore.fail_midway("Restore", error)
            return 0
        job = build_redis_job(restore.body, plan, policy=policy, spec=spec, image=restore.image)
        try:
            kube.batch().create_namespaced_job(restore.namespace, job, field_manager=FIELD_MANAGER)
        except ApiException as error:
            if error.status != 409:
                raise
        restore.status.set(jobName=job["metadata"]["name"])
        restore.flush()
        restore.event(
            "RestoreJobCreated", f"Job {job['metadata']['name']} restores {plan.key} into {where(plan.target)}"
        )
        return POLL_SECONDS

    def check(self) -> None:
        from .restore import SCALING_UP

        restore = self.restore
        try:
            spec, policy, plan, _ = self.plan()
            env = self.credentials(spec, policy, plan.target)
            client = connect_target(plan.target, env, self.material(plan.target))
            try:
                found = keyspace(client)
            finally:
                client.close()
            summary = job_summary(job_pods(kube.KubeApi(), restore.namespace, job_name(restore.name)), "redis") or {}
            wrong = keyspace_mismatches(plan.keyspace, found, summary)
        except RunbookError as error:
            restore.fail_midway("Check", error)
            return
        if wrong:
            restore.fail_midway(
                "Check", RunbookError("ContentMismatch", f"{where(plan.target)}: {'; '.join(wrong)[:400]}")
            )
            return
        keys = sum(found.values())
        restore.status.set(checks={**(restore.status.get("checks") or {}), "keyspace": found, "keys": keys})
        per_db = ", ".join(f"{db}={n}" for db, n in sorted(found.items()))
        restore.end("Check", "Succeeded", f"{keys} keys ({per_db}): as the manifest recorded at backup time")
        restore.begin("ScaleUp", SCALING_UP)
        restore.flush()


def keyspace_mismatches(recorded: dict[str, int], found: dict[str, int], summary: dict[str, Any]) -> list[str]:
    """The dbs whose key count is not the manifest's. Keys with a TTL may have run out since the backup: the
    Job counted those it found expired (``expiredSinceBackup``) and the keys with a TTL it restored
    (``volatile``); the shortfall of each db must be explained by them, and no db may hold more."""
    expired = int(summary.get("expiredSinceBackup") or 0)
    volatile = {str(db): int(n) for db, n in (summary.get("volatile") or {}).items()}
    wrong = []
    for db in sorted(set(recorded) | set(found)):
        want, have = recorded.get(db, 0), found.get(db, 0)
        if have > want or want - have > expired + volatile.get(db, 0):
            wrong.append(f"{db}: {have} keys, manifest {want}")
    shortfall = sum(recorded.values()) - sum(found.values())
    if not wrong and shortfall > expired + sum(volatile.values()):
        wrong.append(f"{shortfall} keys fewer than the manifest's, {expired} expired since the backup")
    return wrong
