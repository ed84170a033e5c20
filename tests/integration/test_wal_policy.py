"""BackupPolicy spec.wal against the real API server (the operator in-process, with the shipped RBAC), a real
PostgreSQL 15, the S3 API server and gpg: the operator checks the replication login, creates and records the
slot, applies the owned receiver Deployment and base-backup CronJob, starts the first base backup, and fills
status.wal, the conditions and the gauges from the slot and the bucket; each bad input is a condition naming
the field; deleting the policy drops its slot. Pods do not run here (no kubelet): the receiver and the base
backup run as processes with exactly the environment their pod specs give them (Secrets resolved)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import pytest
from prometheus_client import REGISTRY
from tests.backup_support import new_bucket
from tests.services import Postgres, S3Server
from tests.wal_support import (
    PASSPHRASE,
    REPLICATION_PASSWORD,
    REPLICATION_USER,
    create_slot,
    replication_role,
    wal_policy_spec,
)

from runbook_operator.builders.wal import base_backup_cronjob_name, receiver_name
from runbook_operator.clients.kube import KubeApi
from runbook_operator.models.plans import WAL_SCRATCH_ENV, parse_lsn, slot_name
from runbook_operator.reconcilers import backup
from runbook_operator.reconcilers.runtime import Context, run_pass

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "runbook.dev", "v1alpha1", "backuppolicies"
CLI = [sys.executable, "-m", "runbook_operator.cli"]
PLAIN_USER, PLAIN_PASSWORD = "wal_plain_login", "wal-plain-login-pw"


class Cluster:
    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self.core = kubernetes.client.CoreV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.batch = kubernetes.client.BatchV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def secret(self, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(self.namespace, {"metadata": {"name": name}, "stringData": data})

    def create_policy(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BackupPolicy", "metadata": {"name": name}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def policy(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def status(self, name: str) -> dict[str, Any]:
        return (self.policy(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def read(self, kind: str, name: str) -> dict[str, Any] | None:
        reader = {
            "Deployment": self.apps.read_namespaced_deployment,
            "CronJob": self.batch.read_namespaced_cron_job,
            "Job": self.batch.read_namespaced_job,
        }[kind]
        try:
            found: dict[str, Any] = self.api.sanitize_for_serialization(reader(name, self.namespace))
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def events(self) -> list[dict[str, Any]]:
        return [
            {"reason": e.reason or "", "message": e.message or "", "type": e.type or "", "count": e.count or 1}
            for e in self.core.list_namespaced_event(self.namespace).items
        ]

    def pod_env(self, container: dict[str, Any], pod_fields: dict[str, str]) -> dict[str, str]:
        """What the kubelet would put in the container's environment: values, Secret and ConfigMap keys, and
        the downward API's fields (``pod_fields``: fieldPath -> value)."""
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
                env[item["name"]] = pod_fields[source["fieldRef"]["fieldPath"]]
        return env


@pytest.fixture
def cluster(api: kubernetes.client.ApiClient, namespace: str, crds_installed: list[str]) -> Cluster:
    return Cluster(api, namespace)


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return new_bucket(s3_server)


@pytest.fixture
def references(cluster: Cluster, postgres: Postgres, s3_server: S3Server) -> None:
    replication_role(postgres)
    with postgres.connect() as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PLAIN_USER,)).fetchone() is None:
            conn.execute(f"CREATE ROLE {PLAIN_USER} LOGIN PASSWORD '{PLAIN_PASSWORD}'")  # no REPLICATION
    cluster.secret("db-credentials", {"username": postgres.superuser, "password": postgres.password})
    cluster.secret("wal-replication", {"username": REPLICATION_USER, "password": REPLICATION_PASSWORD})
    cluster.secret("wal-plain", {"username": PLAIN_USER, "password": PLAIN_PASSWORD})
    cluster.secret(
        "backup-s3-credentials",
        {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
    )
    cluster.secret("backup-gpg", {"passphrase": PASSPHRASE})


def slots(server: Postgres) -> dict[str, tuple[str, bool]]:
    with server.connect() as conn:
        rows = conn.execute("SELECT slot_name, slot_type, active FROM pg_replication_slots").fetchall()
    return {str(name): (str(kind), bool(active)) for name, kind, active in rows}


def gauge(name: str, namespace: str, policy: str) -> float | None:
    value: float | None = REGISTRY.get_sample_value(name, {"namespace": namespace, "policy": policy})
    return value


def run_as_pod(
    cluster: Cluster, container: dict[str, Any], pod_fields: dict[str, str], log: Path, **overrides: str
) -> subprocess.Popen[bytes]:
    """The container's command as a host process with its pod's environment (the kubelet's part)."""
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG")}
    env = {**base, **cluster.pod_env(container, pod_fields), **overrides}
    with log.open("ab") as out:
        return subprocess.Popen(
            [*CLI, *container["args"]], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def children(policy: str) -> list[tuple[str, str]]:
    return [("Deployment", receiver_name(policy)), ("CronJob", base_backup_cronjob_name(policy))]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """The test's agent processes, stopped at the end; their logs' tails on stderr (shown when a test fails)."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
    for log in sorted(tmp_path.glob("*.log")):
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)


def test_slot_children_and_status_then_the_slot_goes_with_the_policy(
    cluster: Cluster,
    references: None,
    postgres: Postgres,
    s3_server: S3Server,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    policy = f"wal{uuid.uuid4().hex[:6]}"
    slot = slot_name(cluster.namespace, policy)
    spec = wal_policy_spec(postgres, s3_server, bucket)
    cluster.create_policy(policy, spec)

    # The slot, created and recorded before the receiver exists; the owned children.
    wait_for(lambda: cluster.status(policy).get("wal", {}).get("slotName") == slot, timeout=90, what="the slot")
    assert slots(postgres)[slot] == ("physical", False)
    deployment = wait_for(lambda: cluster.read("Deployment", receiver_name(policy)), timeout=30, what="receiver")
    cronjob = wait_for(lambda: cluster.read("CronJob", base_backup_cronjob_name(policy)), timeout=30, what="cron")
    uid = (cluster.policy(policy) or {})["metadata"]["uid"]
    for child in (deployment, cronjob):
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("BackupPolicy", policy, uid, True)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["wal-receive", "--namespace", cluster.namespace, "--policy", policy]
    assert (
        container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsUser"] == 10001
    )
    assert {v["name"]: v["emptyDir"]["medium"] for v in pod["volumes"]} == {"tmp": "Memory", "wal": "Memory"}
    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "wal-replication", "key": "password"}
    assert REPLICATION_PASSWORD not in json.dumps(deployment) + json.dumps(cronjob)
    assert cronjob["spec"]["schedule"] == spec["schedule"]

    # The first base backup starts at once (the chain needs one).
    jobs = wait_for(
        lambda: (
            cluster.batch.list_namespaced_job(
                cluster.namespace, label_selector="app.kubernetes.io/component=base-backup"
            ).items
        ),
        timeout=60,
        what="the first base backup Job",
    )
    job = cluster.read("Job", jobs[0].metadata.name)
    assert job is not None

    # The kubelet's part: the receiver as its pod would run it, then the base backup Job's pod.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    receiver = run_as_pod(
        cluster,
        container,
        {"metadata.name": f"{receiver_name(policy)}-abc12"},
        tmp_path / "receiver.log",
        **{WAL_SCRATCH_ENV: str(scratch), "HOME": str(tmp_path)},
    )
    processes.append(receiver)
    wait_for(lambda: slots(postgres)[slot][1], timeout=120, what="the receiver on the slot")
    base_container = job["spec"]["template"]["spec"]["containers"][0]
    base = run_as_pod(
        cluster,
        base_container,
        {"metadata.labels['batch.kubernetes.io/job-name']": job["metadata"]["name"]},
        tmp_path / "base.log",
        HOME=str(tmp_path),
    )
    assert base.wait(300) == 0, (tmp_path / "base.log").read_text()
    with postgres.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS wal_policy_rows (id serial, note text)")
        conn.execute("INSERT INTO wal_policy_rows (note) SELECT 'row ' || g FROM generate_series(1, 1000) g")
        written = parse_lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])

    # The operator's passes (every 30 s) fill status.wal from the slot and the bucket.
    def filled() -> dict[str, Any] | None:
        wal = cluster.status(policy).get("wal") or {}
        ready = wal.get("windowSeconds") is not None and parse_lsn(wal.get("lastArchivedLsn") or "0/0") >= written
        return wal if ready and wal.get("slotActive") else None

    started = time.monotonic()
    # Generous: on a loaded 2-core machine gpg and the S3 PUTs of the first segments take long.
    wal = wait_for(filled, timeout=300, what=f"status.wal with the window through {written:X}")
    print(
        f"status.wal filled {time.monotonic() - started:.1f} s after the rows were written: {wal}", file=sys.__stderr__
    )
    assert wal["receiver"] == receiver_name(policy) and wal["baseBackupCronJob"] == base_backup_cronjob_name(policy)
    assert wal["baseBackups"] == 1 and wal["segments"] >= 1 and wal["timeline"] == 1
    assert wal["lastBaseBackup"].endswith("/") and "/base/" in wal["lastBaseBackup"]
    assert wal["earliestRecoverableTime"] <= wal["latestRecoverableTime"]
    assert isinstance(wal["slotRetainedBytes"], int) and wal["slotRetainedBytes"] >= 0
    archiving, window = cluster.condition(policy, "WALArchiving"), cluster.condition(policy, "RecoveryWindow")
    assert (archiving["status"], archiving["reason"]) == ("True", "Streaming"), archiving
    assert (window["status"], window["reason"]) == ("True", "Available"), window
    assert cluster.condition(policy, "Ready")["status"] == "True"
    assert gauge("runbook_wal_recovery_window_seconds", cluster.namespace, policy) == float(wal["windowSeconds"])
    lag = gauge("runbook_wal_archive_lag_seconds", cluster.namespace, policy)
    assert lag is not None and 0 <= lag < 120
    assert gauge("runbook_wal_slot_retained_bytes", cluster.namespace, policy) is not None
    reasons = {e["reason"] for e in cluster.events()}
    assert {"SlotCreated", "BaseBackupStarted"} <= reasons
    shown = json.dumps(cluster.events()) + json.dumps(cluster.status(policy))
    assert REPLICATION_PASSWORD not in shown and postgres.password not in shown

    # At rest a pass changes no child (each is applied only when it differs).
    versions = [(cluster.read(k, n) or {})["metadata"]["resourceVersion"] for k, n in children(policy)]
    run_pass(Context.of(backup.POLICY, cluster.policy(policy) or {}, KubeApi()), backup.reconcile)
    assert [(cluster.read(k, n) or {})["metadata"]["resourceVersion"] for k, n in children(policy)] == versions

    # A deleted policy drops its slot (the receiver stopped first, as scaling its Deployment to 0 would).
    receiver.terminate()
    assert receiver.wait(60) == 0, (tmp_path / "receiver.log").read_text()[-2000:]
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, policy)
    wait_for(lambda: cluster.policy(policy) is None, timeout=60, what="the policy gone")
    assert slot not in slots(postgres)
    assert "SlotDropped" in {e["reason"] for e in cluster.events()}


def test_each_bad_input_is_a_condition_naming_the_field(
    api: kubernetes.client.ApiClient,
    cluster: Cluster,
    references: None,
    postgres: Postgres,
    s3_server: S3Server,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
    tmp_path: Path,
) -> None:
    from tests.integration.conftest import grant

    taken = f"someone_elses_{uuid.uuid4().hex[:6]}"
    create_slot(postgres, taken)
    minimal = Postgres(settings={"wal_level": "minimal", "max_wal_senders": "0"}).start()
    try:
        replication_role(minimal)
        grant(api, cluster.namespace, hosts=[(minimal.host, minimal.port)])
        plain = wal_policy_spec(postgres, s3_server, bucket)
        plain["wal"]["replicationCredentialsSecretRef"] = {"name": "wal-plain"}
        cluster.create_policy("noreplication", plain)
        cluster.create_policy("minimal", wal_policy_spec(minimal, s3_server, bucket))
        cluster.create_policy("taken", wal_policy_spec(postgres, s3_server, bucket, slotName=taken))
        expected = {
            "noreplication": ("ReplicationNotPermitted", "spec.wal.replicationCredentialsSecretRef:"),
            "minimal": ("WALLevelMinimal", "spec.wal:"),
            "taken": ("SlotTaken", "spec.wal.slotName:"),
        }
        for name, (reason, field) in expected.items():
            ready = wait_for(
                lambda name=name, reason=reason: (c := cluster.condition(name, "Ready")).get("reason") == reason and c,
                timeout=90,
                what=f"{name}: Ready=False {reason}",
            )
            assert ready["status"] == "False" and ready["message"].startswith(field), ready
            archiving = cluster.condition(name, "WALArchiving")
            assert (archiving["status"], archiving["reason"]) == ("False", reason)
            assert cluster.read("Deployment", receiver_name(name)) is None  # nothing started
            assert not {"slotName", "receiver"} & set(cluster.status(name).get("wal") or {})
        print({name: cluster.condition(name, "Ready")["message"] for name in expected}, file=sys.__stderr__)
        assert PLAIN_USER in cluster.condition("noreplication", "Ready")["message"]
        assert "wal_level=minimal" in cluster.condition("minimal", "Ready")["message"]
        assert slot_name(cluster.namespace, "noreplication") not in slots(postgres)  # none for a refused policy
        assert slots(minimal) == {}
        # Deleting the policy whose slot name was taken leaves the other owner's slot alone.
        cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "taken")
        wait_for(lambda: cluster.policy("taken") is None, timeout=60, what="the policy gone")
        assert taken in slots(postgres)
    finally:
        minimal.stop()
        with postgres.connect() as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (taken,))


def test_disabling_stops_the_receiver_and_drops_the_slot(
    cluster: Cluster,
    references: None,
    postgres: Postgres,
    s3_server: S3Server,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    policy = f"off{uuid.uuid4().hex[:6]}"
    slot = slot_name(cluster.namespace, policy)
    cluster.create_policy(policy, wal_policy_spec(postgres, s3_server, bucket))
    deployment = wait_for(lambda: cluster.read("Deployment", receiver_name(policy)), timeout=90, what="receiver")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    receiver = run_as_pod(
        cluster,
        deployment["spec"]["template"]["spec"]["containers"][0],
        {"metadata.name": f"{receiver_name(policy)}-abc12"},
        tmp_path / "receiver.log",
        **{WAL_SCRATCH_ENV: str(scratch), "HOME": str(tmp_path)},
    )
    processes.append(receiver)
    wait_for(lambda: slots(postgres).get(slot, ("", False))[1], timeout=120, what="the receiver on the slot")

    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, policy, {"spec": {"wal": {"enabled": False}}}
    )
    # The kubelet's part: the Deployment at 0 replicas stops its pod.
    wait_for(
        lambda: (cluster.read("Deployment", receiver_name(policy)) or {})["spec"]["replicas"] == 0,
        timeout=60,
        what="the receiver scaled to 0",
    )
    receiver.terminate()
    assert receiver.wait(60) == 0, (tmp_path / "receiver.log").read_text()[-2000:]
    assert (cluster.read("CronJob", base_backup_cronjob_name(policy)) or {})["spec"]["suspend"] is True
    wait_for(lambda: slot not in slots(postgres), timeout=90, what="the slot dropped")
    archiving = wait_for(
        lambda: (c := cluster.condition(policy, "WALArchiving")).get("reason") == "Disabled" and c,
        timeout=60,
        what="WALArchiving Disabled",
    )
    assert archiving["status"] == "False"
    assert not (cluster.status(policy).get("wal") or {}).get("slotName")
    assert cluster.condition(policy, "Ready")["status"] == "True"
    assert gauge("runbook_wal_slot_retained_bytes", cluster.namespace, policy) is None


def test_a_slot_without_receiver_too_long_is_slot_inactive(
    cluster: Cluster,
    references: None,
    postgres: Postgres,
    s3_server: S3Server,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    """No receiver ever connects (its pod cannot start): Unknown at first, then False (SlotInactive) once
    receiverGoneSeconds (60, the least allowed) have passed, with a Warning Event; the server keeps the WAL."""
    policy = f"gone{uuid.uuid4().hex[:6]}"
    slot = slot_name(cluster.namespace, policy)
    cluster.create_policy(policy, wal_policy_spec(postgres, s3_server, bucket, receiverGoneSeconds=60))
    first = wait_for(
        lambda: (c := cluster.condition(policy, "WALArchiving")).get("reason") and c, timeout=90, what="WALArchiving"
    )
    assert (first["status"], first["reason"]) == ("Unknown", "ReceiverNotConnected"), first
    with postgres.connect() as conn:  # WAL the slot keeps
        conn.execute("CREATE TABLE IF NOT EXISTS wal_gone_rows (id serial, note text)")
        conn.execute("INSERT INTO wal_gone_rows (note) SELECT repeat('x', 200) FROM generate_series(1, 5000)")
    started = time.monotonic()
    gone = wait_for(
        lambda: (c := cluster.condition(policy, "WALArchiving")).get("reason") == "SlotInactive" and c,
        timeout=150,
        what="WALArchiving=False SlotInactive",
    )
    print(
        f"SlotInactive {time.monotonic() - started:.0f} s after the first pass: {gone['message']}", file=sys.__stderr__
    )
    assert gone["status"] == "False" and "spec.wal.receiverGoneSeconds: 60" in gone["message"]
    assert slot in gone["message"] and receiver_name(policy) in gone["message"]
    assert any(e["reason"] == "SlotInactive" and e["type"] == "Warning" for e in cluster.events())
    retained = (cluster.status(policy).get("wal") or {}).get("slotRetainedBytes")
    assert isinstance(retained, int) and retained > 1_000_000  # the 1 MB written since the slot was made
    assert cluster.condition(policy, "Ready")["status"] == "True"  # the dumps go on
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, policy)
    wait_for(lambda: cluster.policy(policy) is None, timeout=60, what="the policy gone")
    assert slot not in slots(postgres)


def switch_segment(server: Postgres) -> str:
    """Some writes, then pg_switch_wal(): the name of the segment that was just completed."""
    with server.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS wal_gap_rows (id serial, note text)")
        conn.execute("INSERT INTO wal_gap_rows (note) SELECT 'row ' || g FROM generate_series(1, 200) g")
        end = conn.execute("SELECT pg_switch_wal()::text").fetchone()[0]
        name: str = conn.execute("SELECT pg_walfile_name(%s::pg_lsn)", (end,)).fetchone()[0]
    return name


def test_a_gap_is_an_event_and_retention_prunes_what_no_point_needs(
    cluster: Cluster,
    references: None,
    postgres: Postgres,
    s3_server: S3Server,
    bucket: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """The real receiver and base backups make the archive; a segment deleted from the bucket is a WALGap Event
    and RecoveryWindow=False naming it; a base backup after the gap opens a window again; retention (1s) then
    deletes the older base backup and the WAL before the newer one's start, gap included."""
    policy = f"gap{uuid.uuid4().hex[:6]}"
    cluster.create_policy(policy, wal_policy_spec(postgres, s3_server, bucket))
    deployment = wait_for(lambda: cluster.read("Deployment", receiver_name(policy)), timeout=90, what="receiver")
    cronjob = wait_for(lambda: cluster.read("CronJob", base_backup_cronjob_name(policy)), timeout=30, what="cron")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    processes.append(
        run_as_pod(
            cluster,
            deployment["spec"]["template"]["spec"]["containers"][0],
            {"metadata.name": f"{receiver_name(policy)}-abc12"},
            tmp_path / "receiver.log",
            **{WAL_SCRATCH_ENV: str(scratch), "HOME": str(tmp_path)},
        )
    )
    slot = slot_name(cluster.namespace, policy)
    wait_for(lambda: slots(postgres).get(slot, ("", False))[1], timeout=120, what="the receiver on the slot")
    base_container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    client = s3_server.client()
    folder = f"backups/{cluster.namespace}/{policy}/"

    def base_backup(job: str) -> None:
        done = run_as_pod(
            cluster,
            base_container,
            {"metadata.labels['batch.kubernetes.io/job-name']": job},
            tmp_path / f"{job}.log",
            HOME=str(tmp_path),
        )
        assert done.wait(300) == 0, (tmp_path / f"{job}.log").read_text()

    def shipped(name: str) -> bool:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{folder}wal/00000001/{name}.json")
        return bool(listed.get("KeyCount"))

    def complete_segments(count: int) -> list[str]:
        names = [switch_segment(postgres) for _ in range(count)]
        wait_for(lambda: all(shipped(n) for n in names), timeout=120, what=f"segments {names} shipped")
        return names

    def a_pass() -> dict[str, Any]:
        run_pass(Context.of(backup.POLICY, cluster.policy(policy) or {}, KubeApi()), backup.reconcile)
        return cluster.status(policy)

    base_backup("base-1")
    first, middle, last = complete_segments(3)
    assert (a_pass().get("wal") or {}).get("windowSeconds") is not None
    assert cluster.condition(policy, "RecoveryWindow")["status"] == "True"

    client.delete_objects(
        Bucket=bucket,
        Delete={"Objects": [{"Key": f"{folder}wal/00000001/{middle}{ext}"} for ext in (".json", ".gpg")]},
    )
    a_pass()
    window = cluster.condition(policy, "RecoveryWindow")
    assert (window["status"], window["reason"]) == ("False", "WALGap") and middle in window["message"], window
    gaps = [e for e in cluster.events() if e["reason"] == "WALGap"]
    assert len(gaps) == 1 and gaps[0]["type"] == "Warning" and middle in gaps[0]["message"], gaps
    assert first < middle < last

    base_backup("base-2")
    complete_segments(1)
    status = a_pass()["wal"]
    window = cluster.condition(policy, "RecoveryWindow")
    assert (window["status"], window["reason"]) == ("True", "Available") and middle in window["message"], window
    assert status["baseBackups"] == 2
    gaps = [e for e in cluster.events() if e["reason"] == "WALGap"]
    assert [e["count"] for e in gaps] == [1], gaps  # told once, not on every pass

    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, policy, {"spec": {"wal": {"retention": "1s"}}}
    )
    time.sleep(1.5)
    status = a_pass()["wal"]
    assert status["baseBackups"] == 1, status
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{folder}wal/").get("Contents", [])]
    assert not [k for k in keys if first in k or last in k], keys  # before the newer base backup's start
    pruned = [e for e in cluster.events() if e["reason"] == "WALPruned"]
    assert pruned and "spec.wal.retention" in pruned[0]["message"]
    assert cluster.condition(policy, "RecoveryWindow")["reason"] == "Available"
    assert middle not in cluster.condition(policy, "RecoveryWindow")["message"]  # the gap went with them
