"""BackupRestore against the real API server (with kwok playing the kubelet for the application's pods),
real PostgreSQL, gpg and the S3 API server, on backups made by the BackupPolicy agent. The Jobs' pods do not
run here: the test runs the agent as a process with the pod's arguments and resolved environment, then sets
the pod's status as the kubelet would (exit code and termination message), and the Job controller finishes
the Job from it. The preflight's verify Job pods are run so as they appear (``Cluster.verify_pods``), the
restore Job's pod when the test says."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import pytest
from tests import helpers
from tests.integration.conftest import grant
from tests.integration.test_restore_agent import ATTACKER_ROW, PADDING, attacker_backup
from tests.restore_support import (
    MANIFEST_KEY,
    OWNER,
    OWNER_PASSWORD,
    SIGNED,
    Backup,
    Kubelet,
    create_empty_database,
    create_shop,
    damage,
    database_text,
    fingerprint,
    make_backup,
    private_key,
    swap_object,
    tamper,
)
from tests.services import GpgKeyring, Postgres, S3Server, free_port

from runbook_operator import metrics
from runbook_operator.builders.restore import DRILL_LABEL, REPLICAS_ANNOTATION, job_name
from runbook_operator.models.plans import (
    MANIFEST_KEY_ENV,
    MANIFEST_KEY_SECRET,
    MANIFEST_KEY_SECRET_KEY,
    RESTORE_PLAN_ENV,
    sign_manifest,
)

pytestmark = pytest.mark.integration

GROUP, VERSION = "runbook.dev", "v1alpha1"
POLICY = "db"
WORKLOADS = {"api": 3, "backend": 5}  # not the runbook's hard-coded 2
PRIVATE_KEY_SECRET = "restore-gpg-private"


class Cluster(Kubelet):
    """Typed API handles for one test namespace, and the kubelet's part for the Jobs' pods."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, wait_for: Callable[..., Any]) -> None:
        self.api, self.namespace, self.wait_for = api, namespace, wait_for
        self.core = kubernetes.client.CoreV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.batch = kubernetes.client.BatchV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def secret(self, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(self.namespace, {"metadata": {"name": name}, "stringData": data})

    def signing_key(self) -> None:
        """The namespace's manifest signing key, as the BackupPolicy reconcile creates it (the tests' agent runs
        sign with it, as the CronJob's pods do)."""
        self.secret(MANIFEST_KEY_SECRET, {MANIFEST_KEY_SECRET_KEY: MANIFEST_KEY})

    def create_workloads(self) -> None:
        for name, replicas in WORKLOADS.items():
            labels = {"app": name}
            self.apps.create_namespaced_deployment(
                self.namespace,
                {
                    "metadata": {"name": name, "labels": labels},
                    "spec": {
                        "replicas": replicas,
                        "selector": {"matchLabels": labels},
                        "template": {
                            "metadata": {"labels": labels},
                            "spec": {
                                "containers": [{"name": name, "image": "registry.example/app:1"}],
                                # Scheduled also while the fake nodes still carry the not-ready taint (a
                                # control plane without the node lifecycle controller never removes it).
                                "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}],
                            },
                        },
                    },
                },
            )
        self.wait_for(self.all_available, timeout=90, what="the workloads to be available")

    def replicas(self) -> dict[str, int]:
        return {name: self.apps.read_namespaced_deployment(name, self.namespace).spec.replicas for name in WORKLOADS}

    def all_available(self) -> bool:
        for name, replicas in WORKLOADS.items():
            status = self.apps.read_namespaced_deployment(name, self.namespace).status
            if (status.available_replicas or 0) < replicas:
                return False
        return True

    def annotations(self) -> dict[str, dict[str, str]]:
        return {
            name: self.apps.read_namespaced_deployment(name, self.namespace).metadata.annotations or {}
            for name in WORKLOADS
        }

    def create(self, plural: str, name: str, spec: dict[str, Any]) -> None:
        kind = {"backuppolicies": "BackupPolicy", "backuprestores": "BackupRestore"}[plural]
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body)

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name))

    def restore(self, name: str) -> dict[str, Any]:
        return self.get("backuprestores", name)

    def condition(self, obj: dict[str, Any], type_: str) -> dict[str, Any]:
        return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})

    def wait_phase(self, name: str, *phases: str, timeout: float = 120) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            obj = self.restore(name)
            return obj if (obj.get("status") or {}).get("phase") in phases else None

        found: dict[str, Any] = self.wait_for(reached, timeout=timeout, what=f"{name} to reach {phases}")
        return found

    def events(self, name: str) -> list[Any]:
        selector = f"involvedObject.name={name}"
        return list(self.core.list_namespaced_event(self.namespace, field_selector=selector).items)

    def printed_columns(self) -> dict[str, Any]:
        """What ``kubectl get backuprestore`` prints: the server-side Table."""
        return helpers.printed_columns(self.api, self.namespace, "backuprestores")


@pytest.fixture
def cluster(
    api: kubernetes.client.ApiClient, namespace: str, crds_installed: list[str], wait_for: Callable[..., Any]
) -> Iterator[Cluster]:
    made = Cluster(api, namespace, wait_for)
    made.signing_key()
    with made.verify_pods():
        yield made


@pytest.fixture
def shop(postgres: Postgres) -> str:
    return create_shop(postgres)


@pytest.fixture
def backup(cluster: Cluster, postgres: Postgres, shop: str, s3_server: S3Server, gpg_keyring: GpgKeyring) -> Backup:
    """A backup by the BackupPolicy agent, the BackupPolicy it belongs to, its Secrets, and the workloads."""
    made = make_backup(postgres, shop, s3_server, gpg_keyring, namespace=cluster.namespace, policy=POLICY, **SIGNED)
    cluster.secret("db-credentials", {"username": OWNER, "password": OWNER_PASSWORD})
    cluster.secret(
        "backup-s3-credentials",
        {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
    )
    cluster.core.create_namespaced_config_map(
        cluster.namespace,
        {"metadata": {"name": "backup-gpg-recipients"}, "data": {"team.asc": gpg_keyring.public_key}},
    )
    cluster.secret(PRIVATE_KEY_SECRET, {"private.asc": private_key(gpg_keyring)})
    cluster.create("backuppolicies", POLICY, made.spec)
    cluster.create_workloads()
    return made


@pytest.fixture
def operator(cluster: Cluster, operator_runner: kopf.testing.KopfRunner) -> Iterator[kopf.testing.KopfRunner]:
    yield operator_runner


def restore_spec(**extra: Any) -> dict[str, Any]:
    return {
        "policyRef": POLICY,
        "backup": "latest",
        "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
        "scaleDown": [{"kind": "Deployment", "name": name} for name in WORKLOADS],
        **extra,
    }


def assert_no_secrets(cluster: Cluster, logs: str, names: list[str], *secrets: str) -> None:
    """No secret value in the operator's logs, Events, status or annotations."""
    assert logs
    texts = [logs]
    for name in names:
        texts.append(json.dumps(cluster.restore(name)))
        texts += [f"{e.reason} {e.message}" for e in cluster.events(name)]
    texts.append(json.dumps(cluster.annotations()))
    for secret in secrets:
        assert all(secret not in text for text in texts)


def step_names(obj: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["name"], s["phase"]) for s in obj["status"]["steps"]]


def test_restore_brings_back_the_rows_and_the_exact_replica_counts(
    cluster: Cluster,
    backup: Backup,
    postgres: Postgres,
    shop: str,
    gpg_keyring: GpgKeyring,
    operator: kopf.testing.KopfRunner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    before = fingerprint(postgres, shop)
    damage(postgres, shop)
    assert fingerprint(postgres, shop) != before

    cluster.create("backuprestores", "rollback", restore_spec())
    job = job_name("rollback")
    cluster.wait_for(lambda: cluster.restore("rollback").get("status", {}).get("jobName"), what="the Job")
    # The application is down, its counts recorded in status and on each workload, before the Job ran.
    status = cluster.restore("rollback")["status"]
    assert status["phase"] == "Restoring"
    assert status["scaledDown"] == [{"kind": "Deployment", "name": n, "replicas": r} for n, r in WORKLOADS.items()]
    assert cluster.replicas() == {"api": 0, "backend": 0}
    for name, replicas in WORKLOADS.items():
        assert json.loads(cluster.annotations()[name][REPLICAS_ANNOTATION])["replicas"] == replicas
    assert fingerprint(postgres, shop) != before  # preflight changed nothing

    result = cluster.run_job_pod(job)
    assert result.returncode == 0, result.stderr
    done = cluster.wait_phase("rollback", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", done["status"]

    assert fingerprint(postgres, shop) == before
    assert cluster.replicas() == WORKLOADS
    assert cluster.all_available()
    assert all(REPLICAS_ANNOTATION not in a for a in cluster.annotations().values())
    status = done["status"]
    assert step_names(done) == [
        ("Preflight", "Succeeded"),
        ("ScaleDown", "Succeeded"),
        ("Restore", "Succeeded"),
        ("Check", "Succeeded"),
        ("ScaleUp", "Succeeded"),
    ]
    assert all(s["startTime"] <= s["endTime"] for s in status["steps"])
    assert status["checks"]["sha256"] == backup.manifest["data"]["sha256"]
    assert status["checks"]["tableRowCounts"] == backup.manifest["source"]["tableRowCounts"]
    assert status["backupKey"] == backup.manifest["data"]["key"]
    ready = cluster.condition(done, "Ready")
    assert ready["status"] == "True" and ready["reason"] == "Restored"
    columns = cluster.printed_columns()
    assert (columns["Policy"], columns["Backup"], columns["Phase"]) == (POLICY, status["backupKey"], "Succeeded")
    assert "Age" in columns
    reasons = [e.reason for e in cluster.events("rollback")]
    for reason in ("RestoreStarted", "PreflightPassed", "ReplicasRecorded", "RestoreJobCreated", "RestoreSucceeded"):
        assert reason in reasons
    audits = [json.loads(r.getMessage()) for r in caplog.records if r.name == "runbook.audit"]
    events = [a["event"] for a in audits if a["name"] == "rollback"]
    assert events == ["restore_started", "restore_completed"]
    assert audits[-1]["outcome"] == "Succeeded" and audits[-1]["compliance"] == "hipaa"
    key_line = private_key(gpg_keyring).splitlines()[3]
    assert_no_secrets(cluster, caplog.text, ["rollback"], OWNER_PASSWORD, key_line)


def test_tampered_backup_is_refused_and_nothing_is_touched(
    cluster: Cluster, backup: Backup, postgres: Postgres, shop: str, s3_server: S3Server, operator: Any
) -> None:
    damage(postgres, shop)
    damaged = fingerprint(postgres, shop)
    tamper(s3_server, backup.bucket, backup.manifest["data"]["key"])
    cluster.create("backuprestores", "tampered", restore_spec())
    done = cluster.wait_phase("tampered", "Failed")
    ready = cluster.condition(done, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ChecksumMismatch"
    assert "does not match the manifest" in ready["message"]
    assert step_names(done) == [("Preflight", "Failed")]
    assert cluster.batch.list_namespaced_job(cluster.namespace).items == [] or all(
        j.metadata.name != job_name("tampered") for j in cluster.batch.list_namespaced_job(cluster.namespace).items
    )
    assert cluster.replicas() == WORKLOADS
    assert all(REPLICAS_ANNOTATION not in a for a in cluster.annotations().values())
    assert fingerprint(postgres, shop) == damaged
    cluster.wait_for(
        lambda: "ChecksumMismatch" in [e.reason for e in cluster.events("tampered")],
        timeout=15,
        what="the ChecksumMismatch Event",
    )


def test_each_bad_input_stops_in_preflight_with_a_clear_condition(
    cluster: Cluster,
    backup: Backup,
    postgres: Postgres,
    shop: str,
    tmp_path: Path,
    operator: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    other = GpgKeyring(tmp_path / "other", email="not-the-team@example.com").start()
    cluster.secret("wrong-key", {"private.asc": private_key(other)})
    closed_port = free_port()
    grant(cluster.api, cluster.namespace, hosts=[("127.0.0.1", closed_port)])  # a port nothing listens on
    cases = {
        "wrong-key": (
            restore_spec(decryptionSecretRef={"name": "wrong-key", "key": "private.asc"}),
            "DecryptionFailed",
            "spec.decryptionSecretRef",
        ),
        "missing-backup": (restore_spec(backup="20200101T000000Z"), "BackupNotFound", "spec.backup"),
        "unreachable-target": (
            restore_spec(target={"host": "127.0.0.1", "port": closed_port}),
            "TargetUnreachable",
            "spec.target",
        ),
        "no-private-key": (
            {k: v for k, v in restore_spec().items() if k != "decryptionSecretRef"},
            "DecryptionKeyMissing",
            "spec.decryptionSecretRef",
        ),
        "missing-workload": (
            restore_spec(scaleDown=[{"kind": "Deployment", "name": "api"}, {"name": "no-such-app"}]),
            "WorkloadNotFound",
            "spec.scaleDown[1]",
        ),
        "missing-policy": (restore_spec(policyRef="nope"), "PolicyNotFound", "spec.policyRef"),
    }
    damaged = fingerprint(postgres, shop)
    for name, (spec, _, _) in cases.items():
        cluster.create("backuprestores", name, spec)
    for name, (_, reason, field) in cases.items():
        done = cluster.wait_phase(name, "Failed")
        ready = cluster.condition(done, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", reason), (name, ready)
        assert field in ready["message"], (name, ready)
        assert step_names(done) == [("Preflight", "Failed")]
        cluster.wait_for(
            lambda reason=reason, name=name: reason in [e.reason for e in cluster.events(name)],
            timeout=15,
            what=f"the {reason} Event",
        )
    assert cluster.replicas() == WORKLOADS
    assert fingerprint(postgres, shop) == damaged
    assert_no_secrets(cluster, caplog.text, list(cases), OWNER_PASSWORD, private_key(other).splitlines()[3])


def test_dry_run_verifies_and_changes_nothing(
    cluster: Cluster, backup: Backup, postgres: Postgres, shop: str, operator: Any
) -> None:
    damage(postgres, shop)
    damaged = fingerprint(postgres, shop)
    cluster.create("backuprestores", "check-only", restore_spec(dryRun=True))
    done = cluster.wait_phase("check-only", "DryRunSucceeded")
    assert step_names(done) == [("Preflight", "Succeeded")]
    assert done["status"]["checks"]["archiveEntries"] > 0
    assert cluster.condition(done, "Ready")["reason"] == "DryRunSucceeded"
    assert cluster.replicas() == WORKLOADS and fingerprint(postgres, shop) == damaged


def test_restore_failing_halfway_brings_the_workloads_back(
    cluster: Cluster, backup: Backup, postgres: Postgres, shop: str, operator: Any
) -> None:
    damage(postgres, shop)
    with postgres.connect(shop, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute("CREATE VIEW big_orders AS SELECT * FROM orders WHERE amount > 50")
    damaged = fingerprint(postgres, shop)
    cluster.create("backuprestores", "halfway", restore_spec())
    cluster.wait_for(lambda: cluster.restore("halfway").get("status", {}).get("jobName"), what="the Job")
    assert cluster.replicas() == {"api": 0, "backend": 0}
    result = cluster.run_job_pod(job_name("halfway"))
    assert result.returncode == 1
    done = cluster.wait_phase("halfway", "Failed")
    ready = cluster.condition(done, "Ready")
    assert ready["reason"] == "RestoreFailed" and "rolled back" in ready["message"], ready
    assert step_names(done) == [
        ("Preflight", "Succeeded"),
        ("ScaleDown", "Succeeded"),
        ("Restore", "Failed"),
        ("ScaleUp", "Succeeded"),
    ]
    assert cluster.replicas() == WORKLOADS and cluster.all_available()
    assert fingerprint(postgres, shop) == damaged


def test_drill_restores_into_a_scratch_database_and_sets_verified(
    cluster: Cluster, backup: Backup, postgres: Postgres, shop: str, operator: Any
) -> None:
    scratch = create_empty_database(postgres)
    cluster.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        cluster.namespace,
        "backuppolicies",
        POLICY,
        {
            "spec": {
                "verification": {
                    "schedule": "* * * * *",
                    "target": {"database": scratch},
                    "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
                }
            }
        },
    )

    def drill() -> str | None:
        items = cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, "backuprestores", label_selector=f"{DRILL_LABEL}={POLICY}"
        )["items"]
        return items[0]["metadata"]["name"] if items else None

    name = cluster.wait_for(drill, timeout=90, what="a drill to be created")
    started = cluster.wait_phase(name, "Restoring", "Failed", timeout=60)
    assert started["status"]["phase"] == "Restoring", started["status"]
    cluster.wait_for(lambda: cluster.restore(name).get("status", {}).get("jobName"), what="the drill's Job")
    assert cluster.replicas() == WORKLOADS  # a drill stops nothing
    result = cluster.run_job_pod(job_name(name))
    assert result.returncode == 0, result.stderr
    done = cluster.wait_phase(name, "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert fingerprint(postgres, scratch) == fingerprint(postgres, shop)

    def verified() -> dict[str, Any] | None:
        policy = cluster.get("backuppolicies", POLICY)
        return policy if cluster.condition(policy, "Verified").get("status") == "True" else None

    policy = cluster.wait_for(verified, timeout=30, what="Verified on the policy")
    record = policy["status"]["lastVerifiedBackup"]
    assert record["key"] == backup.manifest["data"]["key"].rsplit("/", 1)[0] + "/"
    assert (record["tables"], record["rows"]) == (2, 15000)
    assert record["restore"] == name
    assert "2 tables, 15000 rows" in cluster.condition(policy, "Verified")["message"]
    gauge = metrics.BACKUP_LAST_VERIFIED.labels(cluster.namespace, POLICY)._value.get()
    assert abs(gauge - datetime.now(UTC).timestamp()) < 300


def test_drill_of_a_tampered_backup_sets_verified_false(
    cluster: Cluster, backup: Backup, postgres: Postgres, s3_server: S3Server, operator: Any
) -> None:
    tamper(s3_server, backup.bucket, backup.manifest["data"]["key"])
    scratch = create_empty_database(postgres)
    verification = {
        "schedule": "* * * * *",
        "target": {"database": scratch},
        "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
    }
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, "backuppolicies", POLICY, {"spec": {"verification": verification}}
    )

    def refuted() -> dict[str, Any] | None:
        policy = cluster.get("backuppolicies", POLICY)
        return policy if cluster.condition(policy, "Verified").get("status") == "False" else None

    policy = cluster.wait_for(refuted, timeout=120, what="Verified=False on the policy")
    assert cluster.condition(policy, "Verified")["reason"] == "ChecksumMismatch"
    assert "lastVerifiedBackup" not in policy["status"]
    cluster.wait_for(
        lambda: "DrillFailed" in [e.reason for e in cluster.events(POLICY)], timeout=15, what="the DrillFailed Event"
    )
    with postgres.connect(scratch) as conn:  # the scratch database was not touched either
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)


# --- restore integrity: swapped archives and forged manifests (issue 13 item 5) ---------------------------


def attacker_row_count(postgres: Postgres, database: str) -> Any:
    with postgres.connect(database) as conn:
        return conn.execute("SELECT count(*) FROM customers WHERE email = %s", (ATTACKER_ROW,)).fetchone()


def write_manifest(s3: S3Server, backup: Backup, manifest: dict[str, Any]) -> None:
    folder = backup.manifest["data"]["key"].rsplit("/", 1)[0]
    s3.client().put_object(Bucket=backup.bucket, Key=f"{folder}/manifest.json", Body=json.dumps(manifest).encode())


def forge(backup: Backup, swapped: Backup, forgery: str) -> dict[str, Any]:
    """What a bucket writer without the namespace's key can write: the manifest naming the swapped object's
    digest and size, without a signature, with the original one kept, or signed with a key of their own."""
    data = {**backup.manifest["data"], **{k: swapped.manifest["data"][k] for k in ("sha256", "sizeBytes")}}
    unsigned = {k: v for k, v in backup.manifest.items() if k != "signature"} | {"data": data}
    return {
        "unsigned": unsigned,
        "signature kept": {**unsigned, "signature": backup.manifest["signature"]},
        "other key": {**unsigned, "signature": sign_manifest(unsigned, "a key of the bucket writer's own")},
    }[forgery]


def enable_drills(cluster: Cluster, postgres: Postgres) -> str:
    """The policy's verification every minute into a new scratch database; returns its name."""
    scratch = create_empty_database(postgres)
    verification = {
        "schedule": "* * * * *",
        "target": {"database": scratch},
        "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
    }
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, "backuppolicies", POLICY, {"spec": {"verification": verification}}
    )
    return scratch


@pytest.mark.parametrize("when", ["before the preflight", "after the preflight"])
def test_a_swapped_archive_is_never_restored(
    cluster: Cluster,
    backup: Backup,
    postgres: Postgres,
    shop: str,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    operator: Any,
    when: str,
) -> None:
    """A bucket writer stores a valid archive that inserts ATTACKER ROW (padded) under the backup's data object
    and keeps the signed manifest. Before the preflight, its digest refuses it; after, the Job reads only the
    object the preflight verified (the plan pins the manifest as read and the ETag): Failed, ChecksumMismatch,
    the target database exactly as it was and the workloads back."""
    signed_manifest = backup.manifest
    assert signed_manifest.get("signature")
    swapped = attacker_backup(postgres, s3_server, gpg_keyring)
    damage(postgres, shop)
    before = database_text(postgres, shop)
    if when == "before the preflight":
        swap_object(s3_server, backup, swapped, PADDING)
    cluster.create("backuprestores", "swapped", restore_spec())
    if when == "after the preflight":
        cluster.wait_for(lambda: cluster.restore("swapped").get("status", {}).get("jobName"), what="the Job")
        pinned = cluster.restore("swapped")["status"]["pinned"]
        assert json.loads(pinned["manifest"]) == signed_manifest and pinned["etag"]
        container = cluster.job_pod(job_name("swapped")).spec.containers[0]
        env = {item.name: item for item in container.env}
        plan = json.loads(env[RESTORE_PLAN_ENV].value)
        assert (plan["manifest"], plan["etag"]) == (signed_manifest, pinned["etag"])
        key_ref = env[MANIFEST_KEY_ENV].value_from.secret_key_ref
        assert (key_ref.name, key_ref.key) == (MANIFEST_KEY_SECRET, MANIFEST_KEY_SECRET_KEY)
        swap_object(s3_server, backup, swapped, PADDING)
        result = cluster.run_job_pod(job_name("swapped"))
        assert result.returncode == 1 and "ChecksumMismatch" in result.stderr, result.stderr
    done = cluster.wait_phase("swapped", "Failed", "Succeeded")
    ready = cluster.condition(done, "Ready")
    assert (done["status"]["phase"], ready["reason"]) == ("Failed", "ChecksumMismatch"), done["status"]
    assert database_text(postgres, shop) == before
    assert attacker_row_count(postgres, shop) == (0,)
    assert cluster.replicas() == WORKLOADS


@pytest.mark.parametrize("forgery", ["unsigned", "signature kept", "other key"])
def test_a_forged_manifest_is_refused_before_anything_is_touched(
    cluster: Cluster,
    backup: Backup,
    postgres: Postgres,
    shop: str,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    operator: Any,
    forgery: str,
) -> None:
    """The swapped object under a manifest naming its digest and size: the preflight refuses the manifest
    (ManifestUnsigned / ManifestForged naming it) before reading any data; nothing is scaled or restored."""
    swapped = attacker_backup(postgres, s3_server, gpg_keyring)
    swap_object(s3_server, backup, swapped, 0)
    write_manifest(s3_server, backup, forge(backup, swapped, forgery))
    damage(postgres, shop)
    before = database_text(postgres, shop)
    cluster.create("backuprestores", "forged", restore_spec())
    done = cluster.wait_phase("forged", "Failed", "Succeeded")
    ready = cluster.condition(done, "Ready")
    reason = "ManifestUnsigned" if forgery == "unsigned" else "ManifestForged"
    assert (done["status"]["phase"], ready["reason"]) == ("Failed", reason), done["status"]
    assert "manifest.json" in ready["message"]
    assert step_names(done) == [("Preflight", "Failed")]
    assert "pinned" not in done["status"]
    assert cluster.replicas() == WORKLOADS
    assert all(REPLICAS_ANNOTATION not in a for a in cluster.annotations().values())
    assert database_text(postgres, shop) == before
    assert attacker_row_count(postgres, shop) == (0,)


@pytest.mark.parametrize("forgery", ["unsigned", "other key"])
def test_a_drill_refuses_a_forged_manifest(
    cluster: Cluster,
    backup: Backup,
    postgres: Postgres,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    operator: Any,
    forgery: str,
) -> None:
    """The policy's drill of the same forgeries: Verified=False with the preflight's reason, the scratch database
    untouched (a drill never accepts an unsigned manifest)."""
    swapped = attacker_backup(postgres, s3_server, gpg_keyring)
    swap_object(s3_server, backup, swapped, 0)
    write_manifest(s3_server, backup, forge(backup, swapped, forgery))
    scratch = enable_drills(cluster, postgres)

    def refuted() -> dict[str, Any] | None:
        policy = cluster.get("backuppolicies", POLICY)
        return policy if cluster.condition(policy, "Verified").get("status") == "False" else None

    policy = cluster.wait_for(refuted, timeout=120, what="Verified=False on the policy")
    reason = "ManifestUnsigned" if forgery == "unsigned" else "ManifestForged"
    assert cluster.condition(policy, "Verified")["reason"] == reason
    assert "lastVerifiedBackup" not in policy["status"]
    with postgres.connect(scratch) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)


def test_an_unsigned_backup_is_restored_only_with_the_visible_opt_out(
    cluster: Cluster, backup: Backup, s3_server: S3Server, operator: Any
) -> None:
    """A backup made before manifests were signed: refused (ManifestUnsigned) unless spec.allowUnsignedBackup,
    which verifies it all the same and says so (ManifestVerified=False, UnsignedBackupAllowed, a Warning)."""
    write_manifest(s3_server, backup, {k: v for k, v in backup.manifest.items() if k != "signature"})
    cluster.create("backuprestores", "refused", restore_spec(dryRun=True))
    refused = cluster.wait_phase("refused", "Failed", "DryRunSucceeded")
    assert cluster.condition(refused, "Ready")["reason"] == "ManifestUnsigned"
    assert "allowUnsignedBackup" in cluster.condition(refused, "Ready")["message"]
    cluster.create("backuprestores", "allowed", restore_spec(dryRun=True, allowUnsignedBackup=True))
    allowed = cluster.wait_phase("allowed", "Failed", "DryRunSucceeded")
    assert allowed["status"]["phase"] == "DryRunSucceeded", allowed["status"]
    verified = cluster.condition(allowed, "ManifestVerified")
    assert (verified["status"], verified["reason"]) == ("False", "UnsignedBackupAllowed")
    cluster.wait_for(
        lambda: any(e.type == "Warning" and e.reason == "UnsignedBackupAllowed" for e in cluster.events("allowed")),
        timeout=15,
        what="the Warning Event",
    )


def test_api_server_refuses_spec_changes_and_drills_onto_the_source(
    cluster: Cluster, backup: Backup, shop: str
) -> None:
    cluster.create("backuprestores", "frozen", restore_spec(dryRun=True))
    with pytest.raises(kubernetes.client.ApiException) as info:
        cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, "backuprestores", "frozen", {"spec": {"dryRun": False}}
        )
    assert "spec is immutable" in info.value.body
    with pytest.raises(kubernetes.client.ApiException) as info:
        cluster.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            cluster.namespace,
            "backuppolicies",
            POLICY,
            {"spec": {"verification": {"schedule": "0 4 * * 0", "target": {"database": shop}}}},
        )
    assert "must name a scratch database" in info.value.body
    assert "verification.decryptionSecretRef" in info.value.body


def test_deleting_a_restore_midway_brings_the_workloads_back(cluster: Cluster, backup: Backup, operator: Any) -> None:
    cluster.create("backuprestores", "abandoned", restore_spec())
    cluster.wait_for(lambda: cluster.restore("abandoned").get("status", {}).get("jobName"), what="the Job")
    assert cluster.replicas() == {"api": 0, "backend": 0}
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "backuprestores", "abandoned")
    cluster.wait_for(lambda: cluster.replicas() == WORKLOADS, what="the recorded counts")
    cluster.wait_for(cluster.all_available, timeout=90, what="the workloads to be available")
    assert all(REPLICAS_ANNOTATION not in a for a in cluster.annotations().values())
    cluster.wait_for(
        lambda: "RestoreAborted" in [e.reason for e in cluster.events("abandoned")],
        timeout=15,
        what="the RestoreAborted Event",
    )

    def job_gone() -> bool:
        try:
            job = cluster.batch.read_namespaced_job(job_name("abandoned"), cluster.namespace)
        except kubernetes.client.ApiException as error:
            return bool(error.status == 404)
        return bool(job.metadata.deletion_timestamp)

    cluster.wait_for(job_gone, what="the Job to be deleted")


def test_operator_restart_midway_resumes_from_status(
    cluster: Cluster,
    backup: Backup,
    postgres: Postgres,
    shop: str,
    operator_kubeconfig: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator stops after the scale-down; the Job's pod finishes while it is away; a new operator
    process state finds everything in the API server and completes the restore with the recorded counts."""
    monkeypatch.setenv("KUBECONFIG", str(operator_kubeconfig))
    args = ["run", "--standalone", "-m", "runbook_operator.main", "--namespace", cluster.namespace]
    before = fingerprint(postgres, shop)
    damage(postgres, shop)
    with kopf.testing.KopfRunner(args, timeout=60):
        cluster.create("backuprestores", "resumed", restore_spec())
        cluster.wait_for(lambda: cluster.restore("resumed").get("status", {}).get("jobName"), what="the Job")
    assert cluster.replicas() == {"api": 0, "backend": 0}
    result = cluster.run_job_pod(job_name("resumed"))
    assert result.returncode == 0, result.stderr
    with kopf.testing.KopfRunner(args, timeout=60):
        done = cluster.wait_phase("resumed", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert [s["name"] for s in done["status"]["steps"]] == ["Preflight", "ScaleDown", "Restore", "Check", "ScaleUp"]
    assert cluster.replicas() == WORKLOADS
    assert fingerprint(postgres, shop) == before


# --- drill targets proven distinct, database names (issue 13 item 3) --------------------------------------


def test_a_drill_onto_the_source_under_another_name_is_refused(
    cluster: Cluster, backup: Backup, postgres: Postgres, shop: str, api: kubernetes.client.ApiClient, operator: Any
) -> None:
    """``localhost`` is not the policy's ``127.0.0.1`` as a string, but the same server and database: the drill
    fails its preflight with TargetIsSource naming spec.verification.target, and nothing is restored."""
    grant(api, cluster.namespace, hosts=[("localhost", postgres.port)])  # the other name may be reached
    damage(postgres, shop)  # a restore of the backup would undo this
    before = fingerprint(postgres, shop)
    verification = {
        "schedule": "* * * * *",
        "target": {"host": "localhost", "database": shop},
        "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
    }
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, "backuppolicies", POLICY, {"spec": {"verification": verification}}
    )

    def drill() -> str | None:
        items = cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, "backuprestores", label_selector=f"{DRILL_LABEL}={POLICY}"
        )["items"]
        return items[0]["metadata"]["name"] if items else None

    name = cluster.wait_for(drill, timeout=90, what="a drill to be created")
    done = cluster.wait_phase(name, "Failed", "Succeeded", "Restoring")
    assert done["status"]["phase"] == "Failed", done["status"]
    ready = cluster.condition(done, "Ready")
    assert ready["reason"] == "TargetIsSource", ready
    assert ready["message"].startswith(
        f"BackupPolicy {POLICY} spec.verification.target: localhost:{postgres.port}/{shop} is the source "
        f"{postgres.host}:{postgres.port}/{shop} (both reach 127.0.0.1:{postgres.port} and database {shop})"
    ), ready
    assert step_names(done) == [("Preflight", "Failed")] and "jobName" not in done["status"]

    def refuted() -> dict[str, Any] | None:
        policy = cluster.get("backuppolicies", POLICY)
        return policy if cluster.condition(policy, "Verified").get("reason") == "TargetIsSource" else None

    cluster.wait_for(refuted, timeout=30, what="Verified=False TargetIsSource on the policy")
    assert fingerprint(postgres, shop) == before  # the source is as it was
    assert cluster.replicas() == WORKLOADS


def test_a_database_name_that_is_a_connection_string_is_refused(
    cluster: Cluster, backup: Backup, postgres: Postgres, shop: str, operator: Any
) -> None:
    """``dbname=...`` would be expanded as a connection string by pg_restore: refused by its name's pattern
    before anything is read or contacted."""
    damage(postgres, shop)
    before = fingerprint(postgres, shop)
    cluster.create(
        "backuprestores", "conninfo", restore_spec(target={"database": f"dbname={shop} host={postgres.host}"})
    )
    done = cluster.wait_phase("conninfo", "Failed", "Succeeded")
    ready = cluster.condition(done, "Ready")
    assert ready["reason"] == "InvalidDatabaseName", ready
    assert ready["message"].startswith("spec.target.database: not a database name"), ready
    assert step_names(done) == [("Preflight", "Failed")] and "scaledDown" not in done["status"]
    assert fingerprint(postgres, shop) == before and cluster.replicas() == WORKLOADS
