"""BackupPolicy without a cluster: the CronJob builders, retention's choice, the agent's pure parts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from runbook_operator.agent.backup import AgentConfig, clean_object, one_line
from runbook_operator.builders.backup import build_backup_now_job, cronjob_name
from runbook_operator.builders.backup import build_cronjob as cronjob_for
from runbook_operator.errors import RunbookError
from runbook_operator.logs import REDACTOR
from runbook_operator.models.backup import BackupPolicySpec
from runbook_operator.models.plans import format_timestamp, parse_timestamp
from runbook_operator.reconcilers.backup import needs_finalizer, schedule_interval
from runbook_operator.reconcilers.catalog import StoredBackup, expired_backups
from runbook_operator.reconcilers.jobs import failure_reason
from tests.helpers import load_samples

SAMPLES = load_samples()
IMAGE = "ghcr.io/runbook-dev/runbook-operator:0.1.0"


def body(sample: str, namespace: str = "hungryhippaahneties") -> dict[str, Any]:
    obj = SAMPLES[sample]
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": {**obj["metadata"], "namespace": namespace, "uid": "uid-1", "generation": 4},
        "spec": obj["spec"],
    }


def spec_of(obj: dict[str, Any]) -> BackupPolicySpec:
    return BackupPolicySpec.model_validate(obj["spec"])


def build_cronjob(obj: dict[str, Any], spec: BackupPolicySpec, *, image: str) -> dict[str, Any]:
    """The CronJob for the policy ``obj``."""
    metadata = obj["metadata"]
    return cronjob_for(
        spec,
        namespace=metadata["namespace"],
        policy=metadata["name"],
        uid=metadata["uid"],
        generation=metadata["generation"],
        image=image,
    )


def container(cronjob: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    return result


def test_cronjob_runs_the_agent_hardened_with_secret_references_only() -> None:
    obj = body("backuppolicy-postgresql")
    cronjob = build_cronjob(obj, spec_of(obj), image=IMAGE)
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] == 600
    assert spec["schedule"] == "0 */6 * * *" and spec["timeZone"] == "UTC" and spec["suspend"] is False
    assert cronjob["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert cronjob["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "runbook-operator"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = container(cronjob)
    assert c["args"] == ["backup", "--namespace", "hungryhippaahneties", "--policy", "postgresql", "--generation", "4"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e for e in c["env"]}
    assert env["PGUSER"]["valueFrom"]["secretKeyRef"] == {"name": "db-credentials", "key": "POSTGRES_USER"}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "db-credentials", "key": "POSTGRES_PASSWORD"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "AWS_SECRET_ACCESS_KEY"
    assert env["RUNBOOK_GPG_RECIPIENTS"]["valueFrom"]["configMapKeyRef"]["key"] == "security-team.asc"
    assert json.loads(env["RUNBOOK_BACKUP_SPEC"]["value"]) == spec_of(obj).to_api()
    # Only the spec, HOME and the job name are plain values; every credential is a reference.
    assert {e["name"] for e in c["env"] if "value" in e} == {"RUNBOOK_BACKUP_SPEC", "HOME"}


def test_redis_tls_ca_is_mounted_from_its_secret_and_the_passphrase_referenced() -> None:
    obj = body("backuppolicy-redis")
    pod = build_cronjob(obj, spec_of(obj), image=IMAGE)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["redis-ca"]["secret"] == {"secretName": "redis-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == {"name": "redis-credentials", "key": "REDIS_PASSWORD"}
    assert env["RUNBOOK_REDIS_CA_FILE"]["value"] == "/etc/runbook/redis-ca/ca.crt"
    assert env["RUNBOOK_GPG_PASSPHRASE"]["valueFrom"]["secretKeyRef"]["name"] == "backup-gpg-passphrase"


def test_redis_client_pair_is_mounted_from_its_tls_secret_never_put_in_the_environment() -> None:
    """The runbook's Redis requires client certificates: tls.crt and tls.key of the kubernetes.io/tls Secret
    are Secret volume items (the key readable by the agent's group only), the environment holds their paths."""
    obj = body("backuppolicy-redis")
    spec = spec_of(obj)
    assert spec.source.redis is not None and spec.source.redis.port == 6380
    assert spec.source.redis.commands.bgsave == "HIPAA_BGSAVE_i9j0k1l2"
    pod = build_cronjob(obj, spec, image=IMAGE)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["redis-client"]["secret"] == {
        "secretName": "redis-tls",
        "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key", "mode": 0o440}],
        "defaultMode": 0o444,
    }
    assert pod["securityContext"]["fsGroup"] == 10001  # the key file's group: the agent can read it, no one else
    c = pod["containers"][0]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["redis-client"] == {
        "name": "redis-client",
        "mountPath": "/etc/runbook/redis-client",
        "readOnly": True,
    }
    env = {e["name"]: e for e in c["env"]}
    assert env["RUNBOOK_REDIS_CERT_FILE"] == {
        "name": "RUNBOOK_REDIS_CERT_FILE",
        "value": "/etc/runbook/redis-client/tls.crt",
    }
    assert env["RUNBOOK_REDIS_KEY_FILE"] == {
        "name": "RUNBOOK_REDIS_KEY_FILE",
        "value": "/etc/runbook/redis-client/tls.key",
    }
    refs = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert all(ref["name"] != "redis-tls" for ref in refs)


def test_kubernetes_export_runs_as_the_administrators_service_account() -> None:
    """The export's pods run as the enabling bundle's ServiceAccount (runbook-export, or runbook-export-secrets
    with includeSecrets); the operator makes no ServiceAccount, Role or RoleBinding, so deletion has nothing
    to remove beyond the backups."""
    obj = body("backuppolicy-kubernetes")
    obj["spec"]["source"]["kubernetes"]["namespaces"] = ["hungryhippaahneties", "other"]
    pod = build_cronjob(obj, spec_of(obj), image=IMAGE)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "runbook-export" and pod["automountServiceAccountToken"] is True
    assert not needs_finalizer(obj["spec"])
    assert needs_finalizer({**obj["spec"], "deletionPolicy": "Delete"})
    obj["spec"]["source"]["kubernetes"]["includeSecrets"] = True
    pod = build_cronjob(obj, spec_of(obj), image=IMAGE)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "runbook-export-secrets"
    postgres = build_cronjob(body("backuppolicy-postgresql"), spec_of(body("backuppolicy-postgresql")), image=IMAGE)
    postgres_pod = postgres["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert "serviceAccountName" not in postgres_pod and postgres_pod["automountServiceAccountToken"] is False


def test_names_fit_the_cronjob_limit_and_backup_now_jobs_are_owned_by_it() -> None:
    assert cronjob_name("db") == "backup-db"
    long = cronjob_name("a" * 200)
    assert len(long) <= 52 and long != cronjob_name("a" * 199)
    cronjob = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        **build_cronjob(body("backuppolicy-postgresql"), spec_of(body("backuppolicy-postgresql")), image=IMAGE),
    }
    cronjob["metadata"]["uid"] = "cj-uid"
    job = build_backup_now_job(cronjob, "2026-11-26")
    assert job["metadata"]["ownerReferences"][0] | {} == {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "name": "backup-postgresql",
        "uid": "cj-uid",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert job["metadata"]["name"] == build_backup_now_job(cronjob, "2026-11-26")["metadata"]["name"]
    assert job["metadata"]["name"] != build_backup_now_job(cronjob, "again")["metadata"]["name"]
    assert job["spec"] == cronjob["spec"]["jobTemplate"]["spec"]


NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)


def backup(days: float, complete: bool = True) -> StoredBackup:
    moment = NOW - timedelta(days=days)
    return StoredBackup(f"p/ns/db/{format_timestamp(moment)}/", moment, complete)


def test_retention_removes_exactly_the_expired_and_keeps_min_keep() -> None:
    backups = [backup(d) for d in (400, 200, 100, 40, 10, 1)] + [backup(90, complete=False)]
    expired = expired_backups(backups, now=NOW, max_age=timedelta(days=30), min_keep=2)
    assert expired == [backup(400), backup(200), backup(100), backup(90, complete=False), backup(40)]
    # min_keep wins over age: the 4 newest complete backups stay even though two are older than 30 days.
    expired = expired_backups(backups, now=NOW, max_age=timedelta(days=30), min_keep=4)
    assert expired == [backup(400), backup(200), backup(90, complete=False)]
    # Incomplete folders never count towards min_keep.
    expired = expired_backups(
        [backup(100, complete=False), backup(50)], now=NOW, max_age=timedelta(days=30), min_keep=1
    )
    assert expired == [backup(100, complete=False)]
    assert expired_backups(backups, now=NOW, max_age=None, min_keep=1) == []


def test_timestamps_round_trip_and_sort() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert format_timestamp(moment) == "20260102T030405Z"
    assert parse_timestamp("20260102T030405Z") == moment
    assert parse_timestamp("manifest.json") is None


def test_exported_objects_lose_live_state_and_controller_children() -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "api",
            "namespace": "prod",
            "uid": "u",
            "resourceVersion": "7",
            "managedFields": [{}],
            "creationTimestamp": "x",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "team": "a"},
        },
        "spec": {"clusterIP": "10.0.0.7", "clusterIPs": ["10.0.0.7"], "ports": [{"port": 80}]},
        "status": {"loadBalancer": {}},
    }
    assert clean_object(service) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "api", "annotations": {"team": "a"}},
        "spec": {"ports": [{"port": 80}]},
    }
    headless = {"kind": "Service", "metadata": {"name": "db"}, "spec": {"clusterIP": "None"}}
    assert clean_object(headless)["spec"] == {"clusterIP": "None"}  # type: ignore[index]
    owned = {"kind": "ConfigMap", "metadata": {"name": "x", "ownerReferences": [{"controller": True}]}}
    assert clean_object(owned) is None
    assert clean_object({"kind": "ConfigMap", "metadata": {"name": "kube-root-ca.crt"}}) is None


def test_failure_reason_prefers_the_agents_line() -> None:
    job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}}
    pod = {
        "status": {
            "containerStatuses": [
                {"state": {"terminated": {"message": "INFO: ...\nbackup failed: EncryptionFailed: gpg encrypt failed"}}}
            ]
        }
    }
    assert failure_reason(job, [pod]) == ("EncryptionFailed", "gpg encrypt failed")
    assert failure_reason(job, []) == ("DeadlineExceeded", "")


def test_agent_config_and_messages_fail_with_the_field_and_no_secret() -> None:
    with pytest.raises(RunbookError, match="RUNBOOK_BACKUP_SPEC is not set"):
        AgentConfig.from_env({}, namespace="ns", policy="p", generation=1)
    with pytest.raises(RunbookError, match=r"spec\.schedule"):
        spec = {**SAMPLES["backuppolicy-postgresql"]["spec"], "schedule": "never"}
        AgentConfig.from_env({"RUNBOOK_BACKUP_SPEC": json.dumps(spec)}, namespace="ns", policy="p", generation=1)
    REDACTOR.register("hunter2-secret")
    assert one_line("pg_dump: error\nFATAL: bad login hunter2-secret\n") == "FATAL: bad login [REDACTED]"


@pytest.mark.parametrize(
    ("schedule", "time_zone", "hours"),
    [
        ("0 */6 * * *", "UTC", 6),
        ("*/15 * * * *", "UTC", 0.25),
        ("30 1 * * *", "UTC", 24),
        ("0 2 * * 1-5", "UTC", 72),  # the weekend is the longest gap
        ("0 0 1 * *", "UTC", 31 * 24),  # the longest month
    ],
)
def test_schedule_interval_is_the_longest_gap_between_runs(schedule: str, time_zone: str, hours: float) -> None:
    """runbook_backup_schedule_interval_seconds: what RunbookBackupOverdue adds its grace to."""
    assert schedule_interval(schedule, time_zone) == hours * 3600
