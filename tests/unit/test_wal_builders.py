"""BackupPolicy spec.wal manifests without a cluster: the receiver Deployment and the base-backup CronJob, and
the reconciler's pure decisions (WALArchiving from the slot, RecoveryWindow from the archive)."""

from __future__ import annotations

import copy
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from runbook_operator.builders.wal import (
    RECEIVER_PEAK_RSS,
    RECEIVER_RESOURCES,
    SCRATCH_DIR,
    base_backup_cronjob_name,
    build_base_backup_cronjob,
    build_receiver,
    receiver_name,
)
from runbook_operator.clients.postgres import Slot
from runbook_operator.models.backup import BackupPolicySpec
from runbook_operator.models.common import parse_quantity
from runbook_operator.models.plans import WAL_SCRATCH_ENV, WAL_SEGMENT_BYTES, WAL_SPEC_ENV
from runbook_operator.reconcilers import wal_catalog
from runbook_operator.reconcilers.wal import archiving_verdict, needs_finalizer, window_verdict

NAMESPACE, POLICY, UID, IMAGE = "hungryhippaahneties", "postgresql", "uid-1", "ghcr.io/runbook-dev/agent:1"

SPEC: dict[str, Any] = {
    "source": {
        "postgresql": {
            "host": "postgresql.hungryhippaahneties.svc",
            "database": "hungryhippaahneties_db",
            "credentialsSecretRef": {"name": "db-credentials", "usernameKey": "POSTGRES_USER"},
            "insecurePlaintext": True,
        }
    },
    "schedule": "0 */6 * * *",
    "timeZone": "Europe/Berlin",
    "destination": {
        "s3": {"bucket": "backups", "region": "us-east-1", "credentialsSecretRef": {"name": "backup-s3-credentials"}}
    },
    "encryption": {"gpg": {"recipientsConfigMapRef": {"name": "backup-gpg-recipients", "key": "team.asc"}}},
    "wal": {"replicationCredentialsSecretRef": {"name": "wal-replication", "passwordKey": "pw"}},
}


def spec(**changes: Any) -> BackupPolicySpec:
    document = copy.deepcopy(SPEC)
    for path, value in changes.items():
        node = document
        *parents, leaf = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return BackupPolicySpec.model_validate(document)


def receiver(policy: BackupPolicySpec) -> dict[str, Any]:
    return build_receiver(policy, namespace=NAMESPACE, policy=POLICY, uid=UID, image=IMAGE)


def base_cronjob(policy: BackupPolicySpec) -> dict[str, Any]:
    return build_base_backup_cronjob(policy, namespace=NAMESPACE, policy=POLICY, uid=UID, image=IMAGE)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container["env"]}


def test_receiver_is_one_hardened_pod_with_a_memory_backed_bounded_scratch() -> None:
    deployment = receiver(spec())
    assert deployment["metadata"]["name"] == f"{POLICY}-wal" == receiver_name(POLICY)
    assert deployment["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "runbook.dev/v1alpha1",
            "kind": "BackupPolicy",
            "name": POLICY,
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    body = deployment["spec"]
    assert body["replicas"] == 1 and body["strategy"] == {"type": "Recreate"}
    labels = body["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in body["selector"]["matchLabels"].items())
    pod = body["template"]["spec"]
    assert pod["restartPolicy"] == "Always" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["args"] == ["wal-receive", "--namespace", NAMESPACE, "--policy", POLICY]
    assert container["image"] == IMAGE
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # Nothing writable but memory: gpg's /tmp and the WAL scratch, both tmpfs with a limit.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes) == {"tmp", "wal"}
    assert all(v["emptyDir"]["medium"] == "Memory" and v["emptyDir"]["sizeLimit"] for v in volumes.values())
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["wal"] == SCRATCH_DIR and env_of(container)[WAL_SCRATCH_ENV]["value"] == SCRATCH_DIR
    # tmpfs pages count in the container's memory: the request holds them and the measured peak of the
    # receiver and gpg (two segment buffers in it), the limit leaves room beyond.
    tmpfs = parse_quantity(volumes["wal"]["emptyDir"]["sizeLimit"]) + parse_quantity(
        volumes["tmp"]["emptyDir"]["sizeLimit"]
    )
    assert tmpfs <= 32 * 1024 * 1024  # no WAL is written there
    peak = parse_quantity(RECEIVER_PEAK_RSS)
    assert peak > 2 * WAL_SEGMENT_BYTES
    assert container["resources"] == RECEIVER_RESOURCES
    assert parse_quantity(RECEIVER_RESOURCES["requests"]["memory"]) * 5 >= 6 * (peak + tmpfs)  # 20% above
    assert parse_quantity(RECEIVER_RESOURCES["limits"]["memory"]) * 5 >= 9 * (peak + tmpfs)  # 80% above


def test_the_agents_get_the_replication_login_and_the_spec_never_a_secret_value() -> None:
    policy = spec()
    for pod_spec in (
        receiver(policy)["spec"]["template"]["spec"],
        base_cronjob(policy)["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    ):
        env = env_of(pod_spec["containers"][0])
        assert env["PGUSER"]["valueFrom"]["secretKeyRef"] == {"name": "wal-replication", "key": "username"}
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "wal-replication", "key": "pw"}
        assert "db-credentials" not in json.dumps([e for e in env.values() if "valueFrom" in e])
        assert json.loads(env[WAL_SPEC_ENV]["value"]) == policy.to_api()  # the spec as the pass confined it
        assert "RUNBOOK_BACKUP_SPEC" not in env
        assert env["RUNBOOK_MANIFEST_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "runbook-manifest-key"
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "backup-s3-credentials"
        assert env["RUNBOOK_GPG_RECIPIENTS"]["valueFrom"]["configMapKeyRef"]["name"] == "backup-gpg-recipients"
        assert all("value" in e or "valueFrom" in e for e in env.values())
    receiver_env = env_of(receiver(policy)["spec"]["template"]["spec"]["containers"][0])
    assert receiver_env["RUNBOOK_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_tls_gives_both_pods_the_ca_file_and_verify_full() -> None:
    policy = spec(
        source__postgresql__tls={"caSecretRef": {"name": "pg-ca", "key": "ca.crt"}},
        source__postgresql__insecurePlaintext=False,
    )
    for pod_spec in (
        receiver(policy)["spec"]["template"]["spec"],
        base_cronjob(policy)["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    ):
        env = env_of(pod_spec["containers"][0])
        assert env["PGSSLMODE"]["value"] == "verify-full"
        assert env["PGSSLROOTCERT"]["value"].endswith("/ca.crt")
        assert {v["name"] for v in pod_spec["volumes"]} >= {"postgres-ca"}


def test_base_backups_follow_their_schedule_or_the_policys() -> None:
    cronjob = base_cronjob(spec())
    assert cronjob["metadata"]["name"] == f"{POLICY}-base" == base_backup_cronjob_name(POLICY)
    body = cronjob["spec"]
    assert (body["schedule"], body["timeZone"], body["suspend"]) == ("0 */6 * * *", "Europe/Berlin", False)
    assert body["concurrencyPolicy"] == "Forbid"
    pod = body["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["containers"][0]["args"] == ["base-backup", "--namespace", NAMESPACE, "--policy", POLICY]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]  # streams: no scratch for the tar
    own = base_cronjob(spec(wal__baseBackups={"schedule": "30 1 * * *", "timeZone": "UTC"}))["spec"]
    assert (own["schedule"], own["timeZone"]) == ("30 1 * * *", "UTC")
    assert base_cronjob(spec(suspend=True))["spec"]["suspend"] is True


def test_disabled_archiving_stops_the_receiver_and_the_base_backups() -> None:
    policy = spec(wal__enabled=False)
    assert receiver(policy)["spec"]["replicas"] == 0
    assert base_cronjob(policy)["spec"]["suspend"] is True


def test_long_policy_names_are_shortened_within_the_cronjob_limit() -> None:
    long = "p" * 60
    for name in (receiver_name(long), base_backup_cronjob_name(long)):
        assert len(name) <= 52
    assert receiver_name(long) != receiver_name("p" * 61)
    assert receiver_name(long).endswith("-wal") and base_backup_cronjob_name(long).endswith("-base")


def test_no_wal_no_manifests() -> None:
    without = copy.deepcopy(SPEC)
    del without["wal"]
    with pytest.raises(ValueError, match=r"spec\.wal"):
        receiver(BackupPolicySpec.model_validate(without))
    assert needs_finalizer(SPEC) and not needs_finalizer(without)


# --- the reconciler's decisions -----------------------------------------------------------------------------

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def slot(*, active: bool, wal_status: str = "reserved") -> Slot:
    return Slot("runbook_ns_db", "physical", active, 42 if active else None, "0/3000000", 1234, wal_status, None)


def test_archiving_is_true_while_streaming_and_false_once_the_receiver_is_gone_too_long() -> None:
    wal = spec().wal
    assert wal is not None and wal.receiver_gone_seconds == 600
    streaming = archiving_verdict(wal, slot(active=True), since=None, now=NOW, receiver="db-wal", last_archived=NOW)
    assert (streaming.status, streaming.reason) == ("True", "Streaming")
    short = archiving_verdict(
        wal, slot(active=False), since=NOW - timedelta(seconds=599), now=NOW, receiver="db-wal", last_archived=None
    )
    assert (short.status, short.reason) == ("Unknown", "ReceiverNotConnected")
    gone = archiving_verdict(
        wal, slot(active=False), since=NOW - timedelta(seconds=601), now=NOW, receiver="db-wal", last_archived=None
    )
    assert (gone.status, gone.reason) == ("False", "SlotInactive")
    assert "spec.wal.receiverGoneSeconds" in gone.message and "1234 bytes" in gone.message
    lost = archiving_verdict(
        wal, slot(active=True, wal_status="lost"), since=None, now=NOW, receiver="db-wal", last_archived=None
    )
    assert (lost.status, lost.reason) == ("False", "SlotLost")


def _segment(segno: int, shipped: datetime, *, partial: bool = False) -> wal_catalog.WALObject:
    start = segno * WAL_SEGMENT_BYTES
    return wal_catalog.WALObject(
        key=f"wal/{segno}.gpg",
        manifest_key=f"wal/{segno}.json",
        manifest={},
        name=f"{segno:024X}",
        timeline=1,
        partial=partial,
        history=False,
        start=start,
        end=start + (WAL_SEGMENT_BYTES // 2 if partial else WAL_SEGMENT_BYTES),
        segment_bytes=WAL_SEGMENT_BYTES,
        shipped=shipped,
    )


def _base(segno: int, stopped: datetime) -> wal_catalog.BaseBackup:
    start = segno * WAL_SEGMENT_BYTES + 40
    return wal_catalog.BaseBackup(
        folder="backups/ns/db/base/20261202T100000Z/",
        key="k",
        manifest_key="m",
        manifest={},
        timeline=1,
        start=start,
        stop=start + 1000,
        start_time=stopped - timedelta(seconds=5),
        stop_time=stopped,
        segment_bytes=WAL_SEGMENT_BYTES,
    )


def test_recovery_window_names_the_window_and_the_missing_wal() -> None:
    empty = wal_catalog.WALCatalog([], {}, {})
    assert window_verdict(empty).reason == "NoBaseBackup"
    stopped = NOW - timedelta(hours=2)
    segments = {(1, n): _segment(n, NOW - timedelta(minutes=10 - n)) for n in (2, 3)}
    segments[(1, 4)] = _segment(4, NOW, partial=True)
    whole = wal_catalog.WALCatalog([_base(2, stopped)], segments, {})
    verdict = window_verdict(whole)
    assert verdict.status == "True" and verdict.reason == "Available"
    assert "2026-12-02T10:00:00Z" in verdict.message and "20261202T100000Z" in verdict.message
    del segments[(1, 3)]
    holed = wal_catalog.WALCatalog([_base(2, stopped)], segments, {})
    verdict = window_verdict(holed)
    assert (verdict.status, verdict.reason) == ("False", "WALGap")
    assert "000000010000000000000003" in verdict.message
    # A newer timeline whose history file is not in the bucket: nothing on it is recoverable.
    segments[(1, 3)] = _segment(3, NOW - timedelta(minutes=7))
    segments[(2, 5)] = dataclasses.replace(_segment(5, NOW), timeline=2)
    orphaned = wal_catalog.WALCatalog([_base(2, stopped)], segments, {})
    verdict = window_verdict(orphaned)
    assert (verdict.status, verdict.reason) == ("False", "WALGap")
    assert "timeline 2" in verdict.message and "00000002.history" in verdict.message
