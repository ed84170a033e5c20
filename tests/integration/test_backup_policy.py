"""BackupPolicy against the real API server, PostgreSQL, gpg and the S3 API server: the CronJob the API server
accepts, the Job watcher that trusts only manifests, retention, backup-now, the Kubernetes export with its
own least-privilege ServiceAccount, and each bad input. Pods do not run here (no kubelet): the agent runs as
a process with exactly the environment the CronJob's pod spec gives it, and the test plays the Job
controller by setting each Job's status."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import pytest
from tests.backup_support import AGENT, bucket_keys, new_bucket, policy_spec, postgresql_source
from tests.helpers import token_kubeconfig
from tests.services import GpgKeyring, Postgres, S3Server

from runbook_operator import metrics
from runbook_operator.builders.backup import EXPORT_SERVICE_ACCOUNT, POLICY_LABEL, cronjob_name
from runbook_operator.clients.kube import KubeApi
from runbook_operator.models.plans import format_timestamp
from runbook_operator.reconcilers import backup
from runbook_operator.reconcilers.runtime import Context, run_pass

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "runbook.dev", "v1alpha1", "backuppolicies"
DB_USER, DB_PASSWORD = "bp_reader", "bp-reader-password-77"
POLICY = "db"


class Cluster:
    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self.core = kubernetes.client.CoreV1Api(api)
        self.batch = kubernetes.client.BatchV1Api(api)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def secret(self, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(self.namespace, {"metadata": {"name": name}, "stringData": data})

    def config_map(self, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_config_map(self.namespace, {"metadata": {"name": name}, "data": data})

    def create_policy(self, spec: dict[str, Any], name: str = POLICY, **metadata: Any) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BackupPolicy",
            "metadata": {"name": name, **metadata},
            "spec": spec,
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def policy(self, name: str = POLICY) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return obj

    def status(self, name: str = POLICY) -> dict[str, Any]:
        return self.policy(name).get("status") or {}

    def condition(self, type_: str, name: str = POLICY) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def cronjob(self, policy: str = POLICY) -> dict[str, Any] | None:
        try:
            obj = self.batch.read_namespaced_cron_job(cronjob_name(policy), self.namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        result: dict[str, Any] = self.api.sanitize_for_serialization(obj)
        return result

    def events(self) -> list[dict[str, Any]]:
        return [
            {"reason": e.reason, "message": e.message or "", "type": e.type, "object": e.involved_object.name}
            for e in self.core.list_namespaced_event(self.namespace).items
        ]

    def scheduled_job(self, cronjob: dict[str, Any], scheduled: datetime) -> str:
        """Create a Job as the CronJob controller would: the template, the owner, the scheduled time."""
        name = f"{cronjob['metadata']['name']}-{int(scheduled.timestamp() // 60)}"
        template = cronjob["spec"]["jobTemplate"]
        self.batch.create_namespaced_job(
            self.namespace,
            {
                "metadata": {
                    "name": name,
                    "labels": template["metadata"]["labels"],
                    "annotations": {
                        "batch.kubernetes.io/cronjob-scheduled-timestamp": scheduled.strftime("%Y-%m-%dT%H:%M:%SZ")
                    },
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "CronJob",
                            "name": cronjob["metadata"]["name"],
                            "uid": cronjob["metadata"]["uid"],
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "spec": template["spec"],
            },
        )
        return name

    def finish_job(self, name: str, *, succeeded: bool, pod_message: str | None = None) -> None:
        """Play the Job controller (and the kubelet's termination message) for a finished run."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if pod_message is not None:
            for pod in self.core.list_namespaced_pod(
                self.namespace, label_selector=f"batch.kubernetes.io/job-name={name}"
            ).items:
                state = {"terminated": {"exitCode": 1, "reason": "Error", "message": pod_message}}
                status = {
                    "phase": "Failed",
                    "containerStatuses": [
                        {"name": "backup", "image": "agent", "imageID": "", "ready": False, "restartCount": 0}
                        | {"state": state}
                    ],
                }
                self.core.patch_namespaced_pod_status(pod.metadata.name, self.namespace, {"status": status})

        def condition(type_: str, reason: str) -> dict[str, str]:
            return {"type": type_, "status": "True", "reason": reason, "lastTransitionTime": now, "lastProbeTime": now}

        if succeeded:
            status: dict[str, Any] = {
                "conditions": [condition("SuccessCriteriaMet", "CompletionsReached"), condition("Complete", "")],
                "succeeded": 1,
                "active": 0,
                "ready": 0,
                "completionTime": now,
            }
            status["conditions"][1]["reason"] = "CompletionsReached"
        else:
            failed = condition("Failed", "BackoffLimitExceeded") | {"message": "Job has reached the backoff limit"}
            status = {
                "conditions": [condition("FailureTarget", "BackoffLimitExceeded"), failed],
                "failed": 1,
                "active": 0,
                "ready": 0,
            }
        if self.batch.read_namespaced_job_status(name, self.namespace).status.start_time is None:
            status["startTime"] = now  # the Job controller has not got to it yet
        self.batch.patch_namespaced_job_status(name, self.namespace, {"status": status})

    def pod_env(self, cronjob: dict[str, Any], job: str) -> dict[str, str]:
        """What the kubelet would put in the agent's environment, resolved from the CronJob's pod spec."""
        container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        env: dict[str, str] = {}
        for item in container["env"]:
            source = item.get("valueFrom") or {}
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = self.core.read_namespaced_secret(ref["name"], self.namespace).data
                env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[item["name"]] = self.core.read_namespaced_config_map(ref["name"], self.namespace).data[ref["key"]]
            else:
                assert source["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
                env[item["name"]] = job
        return env


def run_pod_agent(
    cluster: Cluster, cronjob: dict[str, Any], job: str, **overrides: str
) -> subprocess.CompletedProcess[str]:
    """Run the agent as the CronJob's container would: its args and its resolved environment."""
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "backup"
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "KUBECONFIG")}
    env = {**base, **cluster.pod_env(cronjob, job), **overrides}
    return subprocess.run(
        [*AGENT, *container["args"][1:]], env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture
def cluster(api: kubernetes.client.ApiClient, namespace: str, crds_installed: list[str]) -> Cluster:
    return Cluster(api, namespace)


@pytest.fixture
def database(postgres: Postgres) -> str:
    name = f"bp_{uuid.uuid4().hex[:6]}"
    with postgres.connect() as conn:
        conn.execute(f"CREATE DATABASE {name}")
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_USER,)).fetchone() is None:
            conn.execute(f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{DB_PASSWORD}' IN ROLE pg_read_all_data")
    with postgres.connect(name) as conn:
        conn.execute("CREATE TABLE patients (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO patients SELECT g, 'patient ' || g FROM generate_series(1, 5000) g")
    return name


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return new_bucket(s3_server)


def pg_policy_spec(postgres: Postgres, database: str, s3: S3Server, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        "source": postgresql_source(postgres.host, postgres.port, database),
        "schedule": "0 */6 * * *",
        "destination": {
            "s3": {
                "bucket": bucket,
                "prefix": "postgresql",
                "endpoint": s3.endpoint,
                "credentialsSecretRef": {"name": "backup-s3-credentials"},
                "serverSideEncryption": "None",
            }
        },
        "encryption": {"gpg": {"recipientsConfigMapRef": {"name": "backup-gpg-recipients", "key": "team.asc"}}},
        **extra,
    }


@pytest.fixture
def references(cluster: Cluster, s3_server: S3Server, gpg_keyring: GpgKeyring) -> None:
    cluster.secret("db-credentials", {"username": DB_USER, "password": DB_PASSWORD})
    cluster.secret(
        "backup-s3-credentials",
        {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
    )
    cluster.config_map("backup-gpg-recipients", {"team.asc": gpg_keyring.public_key})


def assert_no_secrets(cluster: Cluster, operator_logs: str, *secrets: str) -> None:
    """No secret value in Events, the policy's status or annotations, or the operator's logs."""
    policy = cluster.policy()
    exposed = json.dumps(cluster.events()) + json.dumps(policy.get("status")) + json.dumps(policy["metadata"])
    exposed += operator_logs
    assert "BackupSucceeded" in operator_logs or "backup_policy" in operator_logs  # the logs were captured
    for secret in secrets:
        assert secret not in exposed


def test_cronjob_accepted_with_expected_spec(
    cluster: Cluster,
    references: None,
    postgres: Postgres,
    database: str,
    s3_server: S3Server,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    spec = pg_policy_spec(postgres, database, s3_server, bucket, timeZone="Europe/Berlin", backoffLimit=1)
    cluster.create_policy(spec)
    cronjob = wait_for(cluster.cronjob, timeout=60, what="the CronJob")
    wait_for(lambda: cluster.condition("Ready").get("status") == "True", timeout=30, what="Ready=True")

    policy = cluster.policy()
    assert cronjob["metadata"]["ownerReferences"] == [
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BackupPolicy",
            "name": POLICY,
            "uid": policy["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert cronjob["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "runbook-operator"
    cj = cronjob["spec"]
    assert (cj["schedule"], cj["timeZone"], cj["suspend"]) == ("0 */6 * * *", "Europe/Berlin", False)
    assert cj["concurrencyPolicy"] == "Forbid" and cj["startingDeadlineSeconds"] == 600
    job = cj["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 1 and job["activeDeadlineSeconds"] == 6 * 3600
    pod = job["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]
    assert container["args"] == ["backup", "--namespace", cluster.namespace, "--policy", POLICY, "--generation", "1"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # The only writable path is a small memory-backed /tmp (gpg's home): no volume that could hold a dump.
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}]
    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "db-credentials", "key": "password"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "backup-s3-credentials"
    assert env["RUNBOOK_GPG_RECIPIENTS"]["valueFrom"]["configMapKeyRef"] == {
        "name": "backup-gpg-recipients",
        "key": "team.asc",
    }
    assert DB_PASSWORD not in json.dumps(cronjob) and s3_server.secret_key not in json.dumps(cronjob)

    status = cluster.status()
    assert status["sourceKind"] == "postgresql" and status["cronJobName"] == cronjob_name(POLICY)
    rules = s3_server.client().get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert [r["AbortIncompleteMultipartUpload"] for r in rules] == [{"DaysAfterInitiation": 1}]
    assert rules[0]["Filter"] == {"Prefix": "postgresql/"}

    # A spec change is converged; an unchanged resync writes nothing.
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, POLICY, {"spec": {"suspend": True}}
    )
    wait_for(lambda: (cluster.cronjob() or {})["spec"]["suspend"] is True, timeout=30, what="the CronJob suspended")
    wait_for(lambda: cluster.condition("Ready").get("reason") == "Suspended", timeout=30, what="Ready: Suspended")
    version = cluster.cronjob()["metadata"]["resourceVersion"]  # type: ignore[index]
    status_version = cluster.policy()["metadata"]["resourceVersion"]
    run_pass(Context.of(backup.POLICY, cluster.policy(), KubeApi()), backup.reconcile)
    backup.pass_named(KubeApi(), cluster.namespace, POLICY, backup.observe)
    assert cluster.cronjob()["metadata"]["resourceVersion"] == version  # type: ignore[index]
    assert cluster.policy()["metadata"]["resourceVersion"] == status_version


def history(list_call: Callable[..., Any], since: str, *args: Any) -> list[tuple[str, str]]:
    """Every watch event of the namespace's objects of one type since the list's resourceVersion ``since``, as
    (type, name): each write is one event, whoever made it."""
    stream = kubernetes.watch.Watch().stream(
        list_call, *args, resource_version=since, timeout_seconds=2, _request_timeout=10
    )
    found = []
    for event in stream:
        obj = event["object"]
        name = obj["metadata"]["name"] if isinstance(obj, dict) else obj.metadata.name
        found.append((event["type"], name))
    return found


def test_creation_writes_the_cronjob_and_status_once_and_events_of_no_change_write_nothing(
    cluster: Cluster,
    references: None,
    postgres: Postgres,
    database: str,
    s3_server: S3Server,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    """The API server's own record (the watch history since before the creation): the operator's writes of a
    new policy are one status write and one CronJob apply (no kopf annotation, no finalizer, no Event); a
    change that asks for no pass (a label) and a CronJob edited by hand cost what they must, nothing more."""
    ns = cluster.namespace
    policies = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["metadata"]["resourceVersion"]
    cronjobs = cluster.batch.list_namespaced_cron_job(ns).metadata.resource_version
    events_before = {(e["reason"], e["object"]) for e in cluster.events()}
    cluster.create_policy(pg_policy_spec(postgres, database, s3_server, bucket))
    wait_for(lambda: cluster.condition("Ready").get("status") == "True", timeout=60, what="Ready=True")
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, POLICY, {"metadata": {"labels": {"team": "db"}}}
    )
    wait_for(lambda: cluster.policy()["metadata"].get("labels"), timeout=10, what="the label")
    time.sleep(3)  # time for any write the label's event (or a late one of the creation) would cause
    list_policies = cluster.custom.list_namespaced_custom_object
    assert history(list_policies, policies, GROUP, VERSION, ns, PLURAL) == [
        ("ADDED", POLICY),  # the test's create
        ("MODIFIED", POLICY),  # the operator's one status write
        ("MODIFIED", POLICY),  # the test's label
    ]
    assert history(cluster.batch.list_namespaced_cron_job, cronjobs, ns) == [("ADDED", cronjob_name(POLICY))]
    policy = cluster.policy()
    assert "finalizers" not in policy["metadata"] and not policy["metadata"].get("annotations")
    assert {(e["reason"], e["object"]) for e in cluster.events()} == events_before

    # A CronJob edited by hand is put back at once, one deleted is made again (a watch of the CronJobs).
    name = cronjob_name(POLICY)
    cluster.batch.patch_namespaced_cron_job(name, ns, {"spec": {"schedule": "* * * * *", "suspend": True}})
    wait_for(
        lambda: (cluster.cronjob() or {}).get("spec", {}).get("schedule") == "0 */6 * * *",
        timeout=30,
        what="the CronJob put back",
    )
    assert cluster.cronjob()["spec"]["suspend"] is False  # type: ignore[index]
    wait_for(lambda: any(e["reason"] == "CronJobApplied" for e in cluster.events()), timeout=15, what="the Event")
    uid = cluster.cronjob()["metadata"]["uid"]  # type: ignore[index]
    cluster.batch.delete_namespaced_cron_job(name, ns)
    wait_for(
        lambda: (cluster.cronjob() or {}).get("metadata", {}).get("uid") not in (None, uid),
        timeout=30,
        what="the CronJob made again",
    )


def _seed_backup(s3: S3Server, bucket: str, folder: str, *, complete: bool) -> None:
    client = s3.client()
    client.put_object(Bucket=bucket, Key=f"{folder}postgresql.dump.gpg", Body=b"old")
    if complete:
        client.put_object(Bucket=bucket, Key=f"{folder}manifest.json", Body=b"{}")


def test_job_watcher_trusts_only_manifests(
    cluster: Cluster,
    references: None,
    postgres: Postgres,
    database: str,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    spec = pg_policy_spec(postgres, database, s3_server, bucket, retention={"maxAge": "30d", "minKeep": 3})
    cluster.create_policy(spec)
    cronjob = wait_for(cluster.cronjob, timeout=60, what="the CronJob")
    base = f"postgresql/{cluster.namespace}/{POLICY}/"
    now = datetime.now(UTC)
    seeds = {age: f"{base}{format_timestamp(now - timedelta(days=age))}/" for age in (400, 200, 100, 90, 10)}
    for age, folder in seeds.items():
        _seed_backup(s3_server, bucket, folder, complete=age != 90)
    labels = {"namespace": cluster.namespace, "policy": POLICY, "source": "postgresql"}
    failures_before = metrics.BACKUP_FAILURES.labels(**labels)._value.get()

    # 1. A scheduled run: the agent (with the pod's environment) succeeds, then the Job completes.
    job = cluster.scheduled_job(cronjob, now.replace(second=0, microsecond=0))
    wait_for(lambda: cluster.status().get("lastScheduleTime"), timeout=30, what="lastScheduleTime")
    result = run_pod_agent(cluster, cronjob, job)
    assert result.returncode == 0, result.stderr
    cluster.finish_job(job, succeeded=True)
    success = wait_for(lambda: cluster.status().get("lastSuccessfulBackup"), timeout=30, what="lastSuccessfulBackup")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert success["job"] == job and success["sizeBytes"] == summary["sizeBytes"]
    assert success["sha256"] == summary["sha256"] and summary["key"].startswith(success["key"])
    assert cluster.condition("LastBackupSucceeded")["status"] == "True"
    assert metrics.BACKUP_LAST_SUCCESS.labels(**labels)._value.get() > 0
    assert metrics.BACKUP_SIZE.labels(**labels)._value.get() == summary["sizeBytes"]
    # Retention: older than 30 days goes, except the 3 newest complete backups (the 100-day one stays).
    keys = bucket_keys(s3_server, bucket)
    remaining = {folder for folder in seeds.values() if any(k.startswith(folder) for k in keys)}
    assert remaining == {seeds[100], seeds[10]}
    wait_for(lambda: any(e["reason"] == "BackupsPruned" for e in cluster.events()), timeout=30, what="prune Event")

    # 2. A run whose agent fails: its one-line reason reaches lastFailure through the pod's termination message.
    job2 = cluster.scheduled_job(cronjob, now.replace(second=0, microsecond=0) + timedelta(minutes=1))
    failed = run_pod_agent(cluster, cronjob, job2, PGPASSWORD="wrong-password-123")
    assert failed.returncode == 1
    line = failed.stderr.strip().splitlines()[-1]
    wait_for(
        lambda: (
            cluster.core.list_namespaced_pod(
                cluster.namespace, label_selector=f"batch.kubernetes.io/job-name={job2}"
            ).items
        ),
        timeout=30,
        what="the Job controller's pod",
    )
    cluster.finish_job(job2, succeeded=False, pod_message=line)
    failure = wait_for(
        lambda: (cluster.status().get("lastFailure") or {}).get("job") == job2 and cluster.status()["lastFailure"],
        timeout=30,
        what="lastFailure",
    )
    assert failure["reason"] == "SourceUnavailable" and "password authentication failed" in failure["message"]
    assert cluster.condition("LastBackupSucceeded")["status"] == "False"
    assert cluster.status()["lastSuccessfulBackup"] == success  # a failed run changes nothing else
    assert metrics.BACKUP_FAILURES.labels(**labels)._value.get() == failures_before + 1

    # 3. A Job that claims success without a manifest does not count.
    job3 = cluster.scheduled_job(cronjob, now.replace(second=0, microsecond=0) + timedelta(minutes=2))
    cluster.finish_job(job3, succeeded=True)
    failure = wait_for(
        lambda: (cluster.status().get("lastFailure") or {}).get("job") == job3 and cluster.status()["lastFailure"],
        timeout=30,
        what="lastFailure of the Job without a manifest",
    )
    assert failure["reason"] == "ManifestMissing"
    assert cluster.status()["lastSuccessfulBackup"] == success

    reasons = {e["reason"] for e in cluster.events() if e["object"] == POLICY}
    assert {"BackupStarted", "BackupSucceeded", "BackupFailed", "BackupsPruned"} <= reasons
    assert_no_secrets(cluster, caplog.text, DB_PASSWORD, s3_server.secret_key, "wrong-password-123")

    # deletionPolicy Retain (the default): deleting the policy keeps every backup.
    kept = bucket_keys(s3_server, bucket)
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, POLICY)
    wait_for(
        lambda: (
            POLICY
            not in [
                p["metadata"]["name"]
                for p in cluster.custom.list_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL)[
                    "items"
                ]
            ]
        ),
        timeout=30,
        what="the policy gone",
    )
    assert bucket_keys(s3_server, bucket) == kept


def test_backup_now_annotation(
    cluster: Cluster,
    references: None,
    postgres: Postgres,
    database: str,
    s3_server: S3Server,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    cluster.create_policy(pg_policy_spec(postgres, database, s3_server, bucket, suspend=True))
    cronjob = wait_for(cluster.cronjob, timeout=60, what="the CronJob")

    def annotate(value: str) -> None:
        patch = {"metadata": {"annotations": {"runbook.dev/backup-now": value}}}
        cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, POLICY, patch)

    def jobs() -> list[Any]:
        return cluster.batch.list_namespaced_job(cluster.namespace, label_selector=f"{POLICY_LABEL}={POLICY}").items

    annotate("2026-11-26T03:00")
    wait_for(lambda: cluster.status().get("backupNow") == "2026-11-26T03:00", timeout=30, what="backupNow")
    [job] = jobs()
    assert job.metadata.owner_references[0].name == cronjob["metadata"]["name"]
    assert job.spec.template.spec.containers[0].args[:2] == ["backup", "--namespace"]
    annotate("2026-11-26T03:00")  # the same value again: nothing new
    annotate("second")
    wait_for(lambda: len(jobs()) == 2, timeout=30, what="a second backup-now Job")
    wait_for(lambda: cluster.status().get("backupNow") == "second", timeout=30, what="backupNow second")
    assert len(jobs()) == 2


def test_missing_secret_and_bucket(
    cluster: Cluster,
    postgres: Postgres,
    database: str,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    cluster.secret("db-credentials", {"username": DB_USER})  # no password key
    cluster.secret(
        "backup-s3-credentials",
        {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
    )
    cluster.config_map("backup-gpg-recipients", {"team.asc": gpg_keyring.public_key})
    cluster.create_policy(pg_policy_spec(postgres, database, s3_server, bucket))
    ready = wait_for(
        lambda: cluster.condition("Ready").get("status") == "False" and cluster.condition("Ready"),
        timeout=30,
        what="Ready=False",
    )
    assert ready["reason"] == "SecretKeyMissing"
    assert "spec.source.postgresql.credentialsSecretRef" in ready["message"]
    assert cluster.cronjob() is None
    wait_for(
        lambda: any(e["reason"] == "SecretKeyMissing" and e["type"] == "Warning" for e in cluster.events()),
        timeout=15,
        what="the SecretKeyMissing Warning Event",
    )

    cluster.secret("db-credentials-2", {"username": DB_USER, "password": DB_PASSWORD})
    nobucket = pg_policy_spec(postgres, database, s3_server, "no-such-bucket-1")
    nobucket["source"]["postgresql"]["credentialsSecretRef"]["name"] = "db-credentials-2"
    cluster.create_policy(nobucket, name="nobucket")
    ready = wait_for(
        lambda: (
            cluster.condition("Ready", "nobucket").get("reason") == "BucketNotFound"
            and cluster.condition("Ready", "nobucket")
        ),
        timeout=30,
        what="BucketNotFound",
    )
    assert "spec.destination.s3.bucket" in ready["message"] and ready["status"] == "False"
    assert cluster.cronjob("nobucket") is None


def generated_key(home: Path, *args: str) -> tuple[str, str]:
    """A public key generated by gpg with ``args`` (armored) and its fingerprint."""
    keyring = GpgKeyring(home)
    keyring.home.mkdir(mode=0o700)
    keyring.run(*args)
    listing = keyring.run("--with-colons", "--list-keys").stdout.decode()
    return keyring.run("--armor", "--export").stdout.decode(), listing.split("fpr:::::::::")[1].split(":")[0]


def test_recipients_pinned_by_fingerprint(
    cluster: Cluster,
    references: None,
    postgres: Postgres,
    database: str,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    bucket: str,
    tmp_path: Path,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    recipients = {"name": "backup-gpg-recipients", "key": "team.asc"}
    pinned = {"gpg": {"recipientsConfigMapRef": recipients, "fingerprints": [gpg_keyring.fingerprint]}}
    cluster.create_policy(pg_policy_spec(postgres, database, s3_server, bucket, encryption=pinned))
    wait_for(lambda: cluster.condition("Ready").get("status") == "True", timeout=60, what="Ready=True")
    assert (cluster.condition("RecipientsPinned")["status"], cluster.condition("RecipientsPinned")["reason"]) == (
        "True",
        "Pinned",
    )
    cronjob = cluster.cronjob()
    assert cronjob is not None

    # Someone who may edit the ConfigMap swaps in their own key: the next backup refuses it (nothing is
    # uploaded), and so does the next reconcile (here one pass, as the policy's timer runs it).
    other, other_fingerprint = generated_key(
        tmp_path / "other", "--quick-generate-key", "Other <o@example.com>", "rsa2048", "encrypt", "never"
    )
    cluster.core.patch_namespaced_config_map("backup-gpg-recipients", cluster.namespace, {"data": {"team.asc": other}})
    job = cluster.scheduled_job(cronjob, datetime.now(UTC).replace(second=0, microsecond=0))
    refused = run_pod_agent(cluster, cronjob, job)
    assert refused.returncode == 1
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"backup failed: RecipientNotPinned: spec.encryption.gpg.recipientsConfigMapRef: key {other_fingerprint}"
        )
    )
    assert bucket_keys(s3_server, bucket) == []
    run_pass(Context.of(backup.POLICY, cluster.policy(), KubeApi()), backup.reconcile)
    ready = cluster.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RecipientNotPinned")
    assert ready["message"].startswith("spec.encryption.gpg.recipientsConfigMapRef: key " + other_fingerprint)
    assert "spec.encryption.gpg.fingerprints" in ready["message"]

    # A key that cannot encrypt now (expired, sign-only) is Ready=False naming the field, pinned or not.
    keys = {
        "RecipientExpired": generated_key(
            tmp_path / "expired",
            *("--faked-system-time", "20200101T000000", "--quick-generate-key", "Old <x@example.com>"),
            *("rsa2048", "encrypt", "1d"),
        ),
        "RecipientCannotEncrypt": generated_key(
            tmp_path / "signer", "--quick-generate-key", "Signer <s@example.com>", "ed25519", "sign", "never"
        ),
    }
    for index, (reason, (armored, fingerprint)) in enumerate(keys.items()):
        name = f"bad-key-{index}"
        cluster.config_map(name, {"team.asc": armored})
        gpg: dict[str, Any] = {"recipientsConfigMapRef": {"name": name, "key": "team.asc"}}
        if index:
            gpg["fingerprints"] = [fingerprint]
        cluster.create_policy(pg_policy_spec(postgres, database, s3_server, bucket, encryption={"gpg": gpg}), name)
        ready = wait_for(
            lambda n=name: cluster.condition("Ready", n).get("status") == "False" and cluster.condition("Ready", n),
            timeout=30,
            what=f"Ready=False of {name}",
        )
        assert ready["reason"] == reason
        assert ready["message"].startswith(f"spec.encryption.gpg.recipientsConfigMapRef: key {fingerprint}")
        assert cluster.cronjob(name) is None

    # Without pins: Ready, and a condition that says how to pin.
    cluster.config_map("unpinned", {"team.asc": gpg_keyring.public_key})
    unpinned = {"gpg": {"recipientsConfigMapRef": {"name": "unpinned", "key": "team.asc"}}}
    cluster.create_policy(pg_policy_spec(postgres, database, s3_server, bucket, encryption=unpinned), "unpinned")
    wait_for(lambda: cluster.condition("Ready", "unpinned").get("status") == "True", timeout=30, what="Ready")
    condition = cluster.condition("RecipientsPinned", "unpinned")
    assert (condition["status"], condition["reason"]) == ("False", "NotPinned")
    assert "spec.encryption.gpg.fingerprints" in condition["message"]


def test_kubernetes_export_reapplies_to_a_fresh_namespace(
    cluster: Cluster,
    api: kubernetes.client.ApiClient,
    kubeconfig: Path,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
    tmp_path: Path,
) -> None:
    ns = cluster.namespace
    cluster.secret(
        "backup-s3-credentials",
        {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
    )
    cluster.secret("api-keys", {"token": "do-not-export-me"})
    cluster.config_map("backup-gpg-recipients", {"team.asc": gpg_keyring.public_key})
    cluster.config_map("nginx-config", {"nginx.conf": "server { listen 8080; }"})
    apps = kubernetes.client.AppsV1Api(api)
    apps.create_namespaced_deployment(
        ns,
        {
            "metadata": {"name": "frontend", "labels": {"app": "frontend"}},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "frontend"}},
                "template": {
                    "metadata": {"labels": {"app": "frontend"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
                },
            },
        },
    )
    cluster.core.create_namespaced_service(
        ns, {"metadata": {"name": "frontend"}, "spec": {"selector": {"app": "frontend"}, "ports": [{"port": 80}]}}
    )
    spec = {
        "source": {"kubernetes": {"namespaces": [ns], "resources": ["deployments", "services", "configmaps"]}},
        "schedule": "15 2 * * *",
        "destination": {
            "s3": {
                "bucket": bucket,
                "prefix": "kubernetes",
                "endpoint": s3_server.endpoint,
                "credentialsSecretRef": {"name": "backup-s3-credentials"},
                "serverSideEncryption": "None",
            }
        },
        "encryption": {"gpg": {"recipientsConfigMapRef": {"name": "backup-gpg-recipients", "key": "team.asc"}}},
    }
    cluster.create_policy(spec, name="configs")
    cronjob = wait_for(lambda: cluster.cronjob("configs"), timeout=60, what="the CronJob")
    # The pods run as the enabling bundle's ServiceAccount (an administrator's); the operator made no RBAC.
    sa_name = EXPORT_SERVICE_ACCOUNT
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa_name and pod["automountServiceAccountToken"] is True
    assert cluster.rbac.list_namespaced_role(ns).items == []

    # The agent runs with the ServiceAccount's own token: exactly what its RoleBinding grants.
    token = cluster.core.create_namespaced_service_account_token(
        sa_name, cluster.namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    sa_config = token_kubeconfig(kubeconfig, token, tmp_path / "sa-kubeconfig")
    result = run_pod_agent(cluster, cronjob, "configs-manual", KUBECONFIG=str(sa_config))
    assert result.returncode == 0, result.stderr
    key = json.loads(result.stdout.strip().splitlines()[-1])["key"]
    encrypted = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    exported = gpg_keyring.decrypt(encrypted).decode()
    assert "do-not-export-me" not in exported and "kind: Secret" not in exported
    for stripped in ("resourceVersion", "managedFields", "uid:", "status:", "creationTimestamp"):
        assert stripped not in exported
    # Secrets are out of runbook-export's reach (runbook-export-secrets is the one for includeSecrets).
    denied = subprocess.run(
        ["kubectl", "--kubeconfig", str(sa_config), "get", "secrets", "-n", ns],
        capture_output=True,
        text=True,
        check=False,
    )
    assert denied.returncode != 0 and "forbidden" in denied.stderr

    fresh = f"rb-restore-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace({"metadata": {"name": fresh, "labels": {"runbook.dev/test": "true"}}})
    try:
        (tmp_path / "export.yaml").write_text(exported)
        applied = subprocess.run(
            ["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-n", fresh, "-f", str(tmp_path / "export.yaml")],
            check=False,
            capture_output=True,
            text=True,
        )
        assert applied.returncode == 0, applied.stderr
        assert apps.read_namespaced_deployment("frontend", fresh).spec.replicas == 3
        assert cluster.core.read_namespaced_config_map("nginx-config", fresh).data == {
            "nginx.conf": "server { listen 8080; }"
        }
        assert cluster.core.read_namespaced_service("frontend", fresh).spec.ports[0].port == 80
    finally:
        cluster.core.delete_namespace(fresh)


def test_kubernetes_export_without_the_administrators_service_account_is_not_ready(
    cluster: Cluster,
    s3_server: S3Server,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    """A namespace whose administrator left out runbook-export-secrets: an export with includeSecrets is
    Ready=False naming that ServiceAccount, and no CronJob is made (the operator creates no ServiceAccount)."""
    cluster.core.delete_namespaced_service_account("runbook-export-secrets", cluster.namespace)
    cluster.secret(
        "backup-s3-credentials",
        {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
    )
    source = {"kubernetes": {"namespaces": [cluster.namespace], "resources": ["configmaps"], "includeSecrets": True}}
    spec = policy_spec(source, s3_server, bucket)
    spec["encryption"] = {"gpg": {"passphraseSecretRef": {"name": "backup-gpg", "key": "passphrase"}}}
    cluster.secret("backup-gpg", {"passphrase": "correct horse battery staple"})
    cluster.create_policy(spec, name="configs")
    ready = wait_for(
        lambda: (
            cluster.condition("Ready", "configs").get("status") == "False" and cluster.condition("Ready", "configs")
        ),
        timeout=30,
        what="Ready=False",
    )
    assert ready["reason"] == "ServiceAccountMissing", ready
    assert "ServiceAccount runbook-export-secrets not found" in ready["message"]
    assert cluster.cronjob("configs") is None


def test_deletion_policy_delete_removes_only_its_backups(
    cluster: Cluster,
    references: None,
    postgres: Postgres,
    database: str,
    s3_server: S3Server,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    cluster.create_policy(pg_policy_spec(postgres, database, s3_server, bucket, deletionPolicy="Delete"))
    wait_for(cluster.cronjob, timeout=60, what="the CronJob")
    wait_for(lambda: cluster.policy()["metadata"].get("finalizers"), timeout=30, what="the finalizer")
    now = datetime.now(UTC)
    ours = [f"postgresql/{cluster.namespace}/{POLICY}/{format_timestamp(now - timedelta(days=d))}/" for d in (1, 2)]
    other = f"postgresql/{cluster.namespace}/other/{format_timestamp(now)}/"
    for folder in [*ours, other]:
        _seed_backup(s3_server, bucket, folder, complete=True)
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, POLICY)
    wait_for(
        lambda: not cluster.custom.list_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL)["items"],
        timeout=60,
        what="the policy gone",
    )
    assert bucket_keys(s3_server, bucket) == [f"{other}manifest.json", f"{other}postgresql.dump.gpg"]


def test_redis_client_certificate_secret_without_tls_key_is_not_ready(
    cluster: Cluster,
    references: None,
    s3_server: S3Server,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    """The runbook's Redis source with a client certificate Secret that lacks its key: Ready=False naming the
    field, a Warning, and no CronJob; once the Secret has the key the policy is accepted."""
    cluster.secret("redis-credentials", {"REDIS_PASSWORD": "redis-pw"})
    cluster.secret("redis-tls", {"ca.crt": "CA", "tls.crt": "CERT"})  # no tls.key
    # the runbook's Redis Service, here in the test's namespace (the tenancy rules: a Service of its own)
    service = {"selector": {"app": "redis"}, "ports": [{"port": 6380}]}
    cluster.core.create_namespaced_service(cluster.namespace, {"metadata": {"name": "redis"}, "spec": service})
    source = {
        "redis": {
            "host": f"redis.{cluster.namespace}.svc",
            "port": 6380,
            "tls": {
                "caSecretRef": {"name": "redis-tls", "key": "ca.crt"},
                "clientCertificateSecretRef": {"name": "redis-tls"},
            },
            "commands": {"bgsave": "HIPAA_BGSAVE_i9j0k1l2"},
            "passwordSecretRef": {"name": "redis-credentials", "key": "REDIS_PASSWORD"},
        }
    }
    cluster.create_policy({**policy_spec(source, s3_server, bucket), "schedule": "0 */6 * * *"})
    ready = wait_for(
        lambda: cluster.condition("Ready").get("status") == "False" and cluster.condition("Ready"),
        timeout=30,
        what="Ready=False",
    )
    assert ready["reason"] == "SecretKeyMissing"
    assert ready["message"].startswith(
        "spec.source.redis.tls.clientCertificateSecretRef: Secret redis-tls has no key 'tls.key'"
    )
    assert cluster.cronjob() is None
    wait_for(
        lambda: any(e["reason"] == "SecretKeyMissing" and e["type"] == "Warning" for e in cluster.events()),
        timeout=15,
        what="the SecretKeyMissing Warning Event",
    )
    cluster.core.patch_namespaced_secret("redis-tls", cluster.namespace, {"stringData": {"tls.key": "KEY"}})
    cronjob = wait_for(cluster.cronjob, timeout=90, what="the CronJob once the Secret has tls.key")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert any(v["name"] == "redis-client" for v in pod["volumes"])
