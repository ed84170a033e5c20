"""A point-in-time BackupRestore through the operator on the real API server (kwok plays the kubelet for the
StatefulSet's pods), on an archive made by B's agents from a real PostgreSQL 15: InPlace scales the StatefulSet
to 0 and back to its exact count, its Job's pod is run as a process on the server's own directory (the claim),
and the server the StatefulSet would start on the recovered directory (started here, at the source's address,
once the StatefulSet is back) is read by the Check: promoted, its newest replayed commit in status."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import pytest
from tests.integration.conftest import grant
from tests.integration.test_pitr import Archive, Restored, make_archive
from tests.restore_support import Kubelet
from tests.services import Postgres, S3Server
from tests.wal_support import PASSPHRASE, REPLICATION_PASSWORD, REPLICATION_USER, SIGNING_KEY

from runbook_operator.builders.restore import REPLICAS_ANNOTATION, job_name
from runbook_operator.models.plans import (
    MANIFEST_KEY_SECRET,
    MANIFEST_KEY_SECRET_KEY,
    PGDATA_ROOT_ENV,
    SCRATCH_DIR_ENV,
)
from runbook_operator.reconcilers import wal_catalog

pytestmark = pytest.mark.integration

GROUP, VERSION = "runbook.dev", "v1alpha1"
POLICY = "db"
STS = "postgresql"


class Cluster(Kubelet):
    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, wait_for: Callable[..., Any]) -> None:
        self.api, self.namespace, self.wait_for = api, namespace, wait_for
        self.core = kubernetes.client.CoreV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def secret(self, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(self.namespace, {"metadata": {"name": name}, "stringData": data})

    def create(self, plural: str, name: str, spec: dict[str, Any]) -> None:
        kind = {"backuppolicies": "BackupPolicy", "backuprestores": "BackupRestore"}[plural]
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body)

    def restore(self, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "backuprestores", name))

    def stateful_set(self, replicas: int) -> None:
        labels = {"app": STS}
        self.apps.create_namespaced_stateful_set(
            self.namespace,
            {
                "metadata": {"name": STS, "labels": labels},
                "spec": {
                    "replicas": replicas,
                    "serviceName": STS,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "securityContext": {"runAsUser": 999, "fsGroup": 999},
                            "containers": [{"name": "postgres", "image": "postgres:15"}],
                            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}],
                        },
                    },
                },
            },
        )
        self.core.create_namespaced_persistent_volume_claim(
            self.namespace,
            {
                "metadata": {"name": f"data-{STS}-0"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            },
        )

    def sts(self) -> Any:
        return self.apps.read_namespaced_stateful_set(STS, self.namespace)


@pytest.fixture
def cluster(
    api: kubernetes.client.ApiClient, namespace: str, crds_installed: list[str], wait_for: Callable[..., Any]
) -> Cluster:
    return Cluster(api, namespace, wait_for)


@pytest.fixture
def source(cluster: Cluster, s3_server: S3Server, api: kubernetes.client.ApiClient) -> Iterator[Archive]:
    """The server, its archive in the bucket (written for this namespace's policy), the policy and its Secrets."""
    server = Postgres().start()
    try:
        with make_archive(server, s3_server, namespace=cluster.namespace, policy=POLICY) as archive:
            grant(api, cluster.namespace, hosts=[(server.host, server.port)], endpoints=[s3_server.endpoint])
            cluster.secret(MANIFEST_KEY_SECRET, {MANIFEST_KEY_SECRET_KEY: SIGNING_KEY})
            cluster.secret("db-credentials", {"username": server.superuser, "password": server.password})
            cluster.secret("wal-replication", {"username": REPLICATION_USER, "password": REPLICATION_PASSWORD})
            cluster.secret("backup-gpg", {"passphrase": PASSPHRASE})
            cluster.secret(
                "backup-s3-credentials",
                {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
            )
            cluster.create("backuppolicies", POLICY, archive.spec)
            cluster.stateful_set(1)
            cluster.wait_for(lambda: (cluster.sts().status.available_replicas or 0) == 1, timeout=90, what="sts up")
            yield archive
    finally:
        server.stop()


def test_in_place_point_in_time_restore_through_the_operator(
    cluster: Cluster, source: Archive, operator_runner: kopf.testing.KopfRunner
) -> None:
    server = source.server
    target = wal_catalog.rfc3339(source.moments["target"])
    spec = {"policyRef": POLICY, "pointInTime": {"targetTime": target, "statefulSet": STS, "dataDirectory": "data"}}
    cluster.create("backuprestores", "recover", spec)
    job = job_name("recover")
    cluster.wait_for(lambda: cluster.restore("recover").get("status", {}).get("jobName"), timeout=90, what="Job")
    status = cluster.restore("recover")["status"]
    assert status["scaledDown"] == [{"kind": "StatefulSet", "name": STS, "replicas": 1}]
    assert cluster.sts().spec.replicas == 0
    assert json.loads(cluster.sts().metadata.annotations[REPLICAS_ANNOTATION])["replicas"] == 1
    point = status["pointInTime"]
    assert point["target"] == target and point["volumeClaim"] == f"data-{STS}-0" and point["segments"] >= 2
    server.stop()  # the StatefulSet's pod is gone: its server stopped
    pod = cluster.job_pod(job)
    assert pod.spec.volumes[1].persistent_volume_claim.claim_name == f"data-{STS}-0"
    assert pod.spec.security_context.run_as_user == 999
    scratch = Path(tempfile.mkdtemp(prefix="runbook-pitr-job-scratch-"))
    result = cluster.run_pod(pod, **{PGDATA_ROOT_ENV: str(server.directory), SCRATCH_DIR_ENV: str(scratch)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (server.directory / "data.before-recover" / "PG_VERSION").exists()
    cluster.wait_for(lambda: cluster.sts().spec.replicas == 1, timeout=90, what="the StatefulSet scaled back")
    with Restored(server.directory, "data", port=server.port) as restored:  # its pod's server, on the claim
        done = cluster.wait_for(
            lambda: (r := cluster.restore("recover")).get("status", {}).get("phase") in ("Succeeded", "Failed") and r,
            timeout=120,
            what="the restore's end",
        )
        labels = restored.labels()
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert [(s["name"], s["phase"]) for s in status["steps"]] == [
        (name, "Succeeded") for name in ("Preflight", "ScaleDown", "Restore", "ScaleUp", "Check")
    ]
    assert labels == ["T1", "T2"]
    point = status["pointInTime"]
    assert point["previousDataDirectory"] == "data.before-recover"
    recovered = wal_catalog.parse_time(point["recoveredTime"])
    assert source.moments["T1"] < recovered <= source.moments["target"]
    assert cluster.sts().spec.replicas == 1 and REPLICAS_ANNOTATION not in (cluster.sts().metadata.annotations or {})
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "Restored" and target in ready["message"]
    texts = json.dumps(status) + " ".join(
        f"{e.reason} {e.message}"
        for e in cluster.core.list_namespaced_event(
            cluster.namespace, field_selector="involvedObject.name=recover"
        ).items
    )
    for secret in (PASSPHRASE, SIGNING_KEY, server.password):
        assert secret not in texts
