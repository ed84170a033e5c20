"""BackupRestore of a Redis backup: the PostgreSQL restore's five steps, with Redis's own Preflight, Job and
Check (ScaleDown and ScaleUp are the shared ones: the writers are stopped and brought back at their exact
recorded counts).

- **Preflight** (read-only): the spec must suit a Redis backup (only ``target.redis``, no PostgreSQL
  fields), the manifest must be a Redis backup's, the target must accept the login (all in the operator);
  then the verify Job (``verify --source redis``) streams the whole object through gpg (SHA-256, full
  decryption, an RDB file). ``dryRun`` ends here.
- **Restore**: the Job loads the RDB into a scratch redis-server in its memory-backed volume, checks it
  against the manifest's keyspace, then FLUSHALL of the target and every key copied (DUMP/RESTORE with its
  TTL), and compares sampled keys; its summary (termination message) carries the figures.
- **Check**: the target's keys per db, counted here, against the Job's summary and the manifest: equal,
  less only keys whose TTL ran out since.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

from ..agent.restore_redis import connect_target, keyspace, where
from ..builders.restore import job_name
from ..builders.restore_redis import build_redis_job, build_redis_plan
from ..clients.redis import TLS_CERT_KEY, TLS_KEY_KEY, TLSMaterial
from ..errors import RunbookError
from ..models.backup import RestoreStepName
from ..models.plans import REDIS_PASSWORD_ENV, RedisRestorePlan, StoredObjectPlan
from ..models.sources import RedisConnection
from ..settings import agent_image
from . import tenancy
from .jobs import job_pods, job_summary
from .restore import ALL_STEPS, Restore

_FIELD = "spec.target.redis"


class RedisTarget:
    """A Redis backup, restored into a Redis (spec.target.redis over the policy's source)."""

    source = "redis"

    def __init__(self, restore: Restore) -> None:
        self.restore = restore

    def steps(self, dry_run: bool) -> tuple[RestoreStepName, ...]:
        return (RestoreStepName.PREFLIGHT,) if dry_run else ALL_STEPS

    # --- what the spec refers to -----------------------------------------------------------------------

    def plan(self) -> tuple[RedisRestorePlan, dict[str, Any]]:
        restore = self.restore
        spec, policy = restore.spec, restore.policy
        source = policy.source.redis
        assert source is not None  # dispatched on it
        if spec.target is not None and spec.target.postgresql_fields:
            raise RunbookError(
                "TargetMismatch",
                f"spec.target.{spec.target.postgresql_fields[0]}: BackupPolicy {spec.policy_ref} backs up Redis; a "
                f"Redis backup is restored into a Redis ({_FIELD}), not a PostgreSQL database",
            )
        restore.decryptable()
        scratch = spec.target.redis if spec.target is not None else None
        target = scratch.resolve(source) if scratch is not None else source
        # the opt-out is the source's (a target inherits it): the message names where it is set
        opt_out = f"BackupPolicy {spec.policy_ref} spec.source.redis"
        restore.ctx.plaintext(tenancy.plaintext_in_use((opt_out, target)))
        manifest = restore.manifest()
        return build_redis_plan(policy, manifest, target, etag=restore.etag), manifest

    def credentials(self, target: RedisConnection) -> dict[str, str]:
        """The target's password as the restore Job's pod gets it, read from the same Secret."""
        env = {}
        if target.password_secret_ref is not None:
            ref = target.password_secret_ref
            env[REDIS_PASSWORD_ENV] = self.restore.secret(ref.name, ref.key, field=f"{_FIELD}.passwordSecretRef")
        return env

    def material(self, target: RedisConnection) -> TLSMaterial | None:
        """The target's TLS PEM texts, read from its Secrets (the Job mounts the same Secrets)."""
        tls = target.tls
        if tls is None or not tls.enabled:
            return None
        ca = certificate = key = None
        if tls.ca_secret_ref is not None:
            ref = tls.ca_secret_ref
            ca = self.restore.secret(ref.name, ref.key, field=f"{_FIELD}.tls.caSecretRef")
        if tls.client_certificate_secret_ref is not None:
            name, field = tls.client_certificate_secret_ref.name, f"{_FIELD}.tls.clientCertificateSecretRef"
            certificate = self.restore.secret(name, TLS_CERT_KEY, field=field)
            key = self.restore.secret(name, TLS_KEY_KEY, field=field)
        return TLSMaterial(ca=ca, certificate=certificate, key=key)

    # --- the steps -------------------------------------------------------------------------------------

    def preflight(self) -> tuple[RedisRestorePlan, dict[str, Any]]:
        restore = self.restore
        plan, manifest = self.plan()
        restore.chosen(plan.key, manifest, where(plan.target))
        restore.workloads_found()
        restore.storage_secrets()
        client = connect_target(plan.target, self.credentials(plan.target), self.material(plan.target))
        try:
            if restore.drill:
                self.not_the_source(plan.target, client)
        finally:
            client.close()
        return plan, manifest

    def verified(self, plan: StoredObjectPlan, figures: Mapping[str, Any]) -> str:
        assert isinstance(plan, RedisRestorePlan)
        return (
            f"{plan.key}: SHA-256 matches the manifest ({plan.size_bytes} bytes), decrypts to an RDB file (version "
            f"{figures.get('rdbVersion')}) of {sum(plan.keyspace.values())} keys; target {where(plan.target)} "
            "reachable"
        )

    def not_the_source(self, target: RedisConnection, client: redis.Redis) -> None:
        """A drill's scratch Redis, proven not to be the policy's source by where both resolve and the servers'
        run_id (``drills.refuse_source``), before anything is flushed."""
        from .drills import Endpoint, redis_identity, refuse_source, resolved

        restore = self.restore
        source = restore.policy.source.redis
        assert source is not None  # dispatched on it

        def endpoint(at: RedisConnection, connected: redis.Redis) -> Endpoint:
            identity = redis_identity(connected, at.commands.info)
            return Endpoint(where(at), resolved(at.host, at.port), None, identity)

        source_client = connect_target(source, self.credentials(source), self.material(source))
        try:
            theirs = endpoint(source, source_client)
        finally:
            source_client.close()
        refuse_source(restore.spec.policy_ref, target=endpoint(target, client), source=theirs)

    def job(self) -> tuple[dict[str, Any], str]:
        restore = self.restore
        plan, _ = self.plan()
        job = build_redis_job(restore.ctx.body, plan, policy=restore.policy, spec=restore.spec, image=agent_image())
        return job, f"Job {job['metadata']['name']} restores {plan.key} into {where(plan.target)}"

    def job_done(self, name: str, pods: list[dict[str, Any]]) -> str:
        restore = self.restore
        summary = job_summary(pods, "redis") or {}
        restore.add_checks(
            {k: summary[k] for k in ("expiredSinceBackup", "sampledKeys") if isinstance(summary.get(k), int)}
        )
        return (
            f"Job {name} loaded {restore.status.backup_key} into a scratch server and copied "
            f"{summary.get('keys', '?')} keys into {restore.status.target} (FLUSHALL first); "
            f"{summary.get('sampledKeys', '?')} sampled keys equal"
        )

    def job_ended(self) -> None:
        pass

    def check(self) -> str:
        restore = self.restore
        plan, _ = self.plan()
        env = self.credentials(plan.target)
        client = connect_target(plan.target, env, self.material(plan.target))
        try:
            found = keyspace(client)
        finally:
            client.close()
        summary = job_summary(job_pods(restore.api, restore.namespace, job_name(restore.name)), "redis") or {}
        wrong = keyspace_mismatches(plan.keyspace, found, summary)
        if wrong:
            raise RunbookError("ContentMismatch", f"{where(plan.target)}: {'; '.join(wrong)[:400]}")
        keys = sum(found.values())
        restore.add_checks({"keyspace": found, "keys": keys})
        per_db = ", ".join(f"{db}={n}" for db, n in sorted(found.items()))
        return f"{keys} keys ({per_db}): as the manifest recorded at backup time"

    def restored(self) -> str:
        status = self.restore.status
        keys = status.checks.keys if status.checks is not None else None
        return (
            f"restored {status.backup_key} into {status.target}: {keys} keys as recorded; workloads back at their "
            "recorded counts"
        )


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
