"""EmergencyIsolation against the real API server, S3 API server and gpg: the runbook's namespace isolated
and released exactly, crash safety with the operator run as a process, and each bad input."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import pytest
import yaml
from prometheus_client import REGISTRY
from tests import helpers
from tests.helpers import OperatorProcess
from tests.integration.conftest import grant
from tests.services import GpgKeyring, S3Server, free_port

import runbook_operator.main
from runbook_operator.builders.isolation import SNAPSHOT_ANNOTATION
from runbook_operator.clients import kube
from runbook_operator.reconcilers import containment, isolation
from runbook_operator.reconcilers.runtime import Context, holder_by_listing, run_pass

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "runbook.dev", "v1alpha1", "emergencyisolations"
# The runbook's namespace: five Deployments with different counts, the database and the cache.
REPLICAS = {"nginx-proxy": 2, "modsecurity-waf": 2, "frontend": 3, "api": 4, "backend": 3}
KEPT = {"postgresql": 1, "redis": 1}
ALLOW_ALL = {"podSelector": {}, "ingress": [{}], "egress": [{}], "policyTypes": ["Ingress", "Egress"]}
S3_SECRET = "evidence-s3"
GPG_CONFIG_MAP = "security-team-keys"


class Cluster:
    """Typed API handles for one test namespace."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self.core = kubernetes.client.CoreV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.batch = kubernetes.client.BatchV1Api(api)
        self.net = kubernetes.client.NetworkingV1Api(api)
        self.hpa = kubernetes.client.AutoscalingV2Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def create_runbook_workloads(self) -> None:
        for doc in yaml.safe_load_all((ROOT / "deploy/dev/workloads.yaml").read_text()):
            doc["spec"]["replicas"] = {**REPLICAS, **KEPT}[doc["metadata"]["name"]]
            create = (
                self.apps.create_namespaced_deployment
                if doc["kind"] == "Deployment"
                else self.apps.create_namespaced_stateful_set
            )
            create(self.namespace, doc)
        self.batch.create_namespaced_cron_job(
            self.namespace,
            {
                "metadata": {"name": "audit-report", "labels": {"app": "audit-report"}},
                "spec": {
                    "schedule": "0 3 * * *",
                    "suspend": False,
                    "jobTemplate": {
                        "spec": {
                            "template": {
                                "spec": {
                                    "restartPolicy": "Never",
                                    "containers": [{"name": "report", "image": "busybox"}],
                                }
                            }
                        }
                    },
                },
            },
        )
        self.net.create_namespaced_network_policy(
            self.namespace, {"metadata": {"name": "allow-all", "labels": {"team": "web"}}, "spec": ALLOW_ALL}
        )
        self.hpa.create_namespaced_horizontal_pod_autoscaler(
            self.namespace,
            {
                "metadata": {"name": "api"},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"},
                    "minReplicas": 2,
                    "maxReplicas": 10,
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                        }
                    ],
                },
            },
        )

    def replicas(self) -> dict[str, int]:
        found = {d.metadata.name: d.spec.replicas for d in self.apps.list_namespaced_deployment(self.namespace).items}
        found.update(
            {s.metadata.name: s.spec.replicas for s in self.apps.list_namespaced_stateful_set(self.namespace).items}
        )
        return found

    def cronjob_suspended(self) -> bool:
        return bool(self.batch.read_namespaced_cron_job("audit-report", self.namespace).spec.suspend)

    def annotations(self) -> dict[str, dict[str, str]]:
        items = [
            *self.apps.list_namespaced_deployment(self.namespace).items,
            *self.apps.list_namespaced_stateful_set(self.namespace).items,
            *self.batch.list_namespaced_cron_job(self.namespace).items,
        ]
        return {i.metadata.name: i.metadata.annotations or {} for i in items}

    def policies(self) -> dict[str, Any]:
        items = self.net.list_namespaced_network_policy(self.namespace).items
        return {p.metadata.name: self.api.sanitize_for_serialization(p) for p in items}

    def create_isolation(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "EmergencyIsolation", "metadata": {"name": name}}
        return dict(
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, {**body, "spec": spec})
        )

    def isolation(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name))
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        return (self.isolation(name) or {}).get("status", {})

    def condition(self, name: str, type: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type), {})

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def delete_isolation(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def events(self, name: str) -> list[Any]:
        selector = f"involvedObject.name={name}"
        return list(self.core.list_namespaced_event(self.namespace, field_selector=selector).items)

    def printed_columns(self) -> dict[str, Any]:
        """What ``kubectl get emergencyisolation`` prints: the server-side Table."""
        return helpers.printed_columns(self.api, self.namespace, PLURAL)


@pytest.fixture
def cluster(api: kubernetes.client.ApiClient, crds_installed: list[str], namespace: str) -> Cluster:
    return Cluster(api, namespace)


@pytest.fixture(autouse=True)
def _containment_watch_scope(namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process operator (kopf's runner, ``--namespace``) with its containment watch of that namespace,
    as cli.py starts it: every test here runs both paths of a first containment (the watch and kopf's event)."""
    monkeypatch.setattr(runbook_operator.main, "SCOPE", [namespace])


@pytest.fixture
def evidence_store(cluster: Cluster, s3_server: S3Server, gpg_keyring: GpgKeyring) -> dict[str, Any]:
    """A bucket in the S3 API server, its keys in a Secret, the security team's public key in a ConfigMap."""
    bucket = f"evidence-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    cluster.core.create_namespaced_secret(
        cluster.namespace,
        {
            "metadata": {"name": S3_SECRET},
            "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
        },
    )
    cluster.core.create_namespaced_config_map(
        cluster.namespace, {"metadata": {"name": GPG_CONFIG_MAP}, "data": {"team.asc": gpg_keyring.public_key}}
    )
    return evidence_spec(bucket, s3_server.endpoint)


def evidence_spec(bucket: str, endpoint: str) -> dict[str, Any]:
    return {
        "capture": True,
        "required": True,
        "destination": {
            "bucket": bucket,
            "prefix": "incidents",
            "endpoint": endpoint,
            "credentialsSecretRef": {"name": S3_SECRET},
        },
        "encryption": {"gpg": {"recipientsConfigMapRef": {"name": GPG_CONFIG_MAP, "key": "team.asc"}}},
    }


def breach_spec(evidence: dict[str, Any] | None, **network: Any) -> dict[str, Any]:
    return {
        "reason": "Suspected exfiltration of PHI through the api service",
        "incidentId": "INC-2026-0042",
        "severity": "P1",
        "network": {"isolate": True, **network},
        "evidence": evidence if evidence is not None else {"capture": False},
    }


def wait_phase(cluster: Cluster, wait_for: Callable[..., Any], name: str, phase: str, timeout: float = 60) -> None:
    wait_for(lambda: cluster.status(name).get("phase") == phase, timeout=timeout, what=f"{name} phase {phase}")


def assert_released_exactly(cluster: Cluster) -> None:
    assert cluster.replicas() == {**REPLICAS, **KEPT}
    assert not cluster.cronjob_suspended()
    assert all(SNAPSHOT_ANNOTATION not in a for a in cluster.annotations().values())
    assert "emergency-isolate" not in cluster.policies()


def test_isolates_the_runbook_namespace_and_releases_exactly(
    cluster: Cluster,
    evidence_store: dict[str, Any],
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="runbook.audit")
    cluster.create_runbook_workloads()
    # A pod bound to a node that does not exist: its logs cannot be read, and the evidence must say why.
    cluster.core.create_namespaced_pod(
        cluster.namespace,
        {
            "metadata": {"name": "ghost", "labels": {"app": "debug"}},
            "spec": {"nodeName": "ghost-node", "containers": [{"name": "shell", "image": "busybox"}]},
        },
    )
    allow_all_before = cluster.policies()["allow-all"]
    cluster.create_isolation("breach", breach_spec(evidence_store, overrideExistingPolicies=True))
    wait_phase(cluster, wait_for, "breach", "Isolated")

    policies = cluster.policies()
    assert set(policies) == {"emergency-isolate"}  # allow-all saved and removed
    assert policies["emergency-isolate"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert cluster.replicas() == {**dict.fromkeys(REPLICAS, 0), **KEPT}
    assert cluster.cronjob_suspended()
    annotations = cluster.annotations()
    assert all(SNAPSHOT_ANNOTATION not in annotations[name] for name in KEPT)  # database and cache untouched

    status = cluster.status("breach")
    assert status["scaled"] == "5/7" and status["removedPolicies"] == ["allow-all"]
    assert [p["name"] for p in status["savedPolicies"]] == ["allow-all"]  # in status, which only the operator writes
    assert status["requestedBy"]  # the field manager that created it
    recorded = {s["name"]: s for s in status["snapshot"]}
    assert {n: recorded[n]["replicas"] for n in REPLICAS} == REPLICAS
    assert (recorded["api"]["hpa"], recorded["api"]["hpaMinReplicas"], recorded["api"]["hpaMaxReplicas"]) == (
        "api",
        2,
        10,
    )
    assert recorded["audit-report"]["suspend"] is False and recorded["postgresql"]["kept"]

    columns = cluster.printed_columns()
    assert (columns["Phase"], columns["Severity"], columns["Incident"], columns["Scaled"]) == (
        "Isolated",
        "P1",
        "INC-2026-0042",
        "5/7",
    )
    assert columns["Evidence"] == status["evidence"]["key"]

    # The evidence decrypts with stock gpg and its hashes match the custody manifest.
    bucket = evidence_store["destination"]["bucket"]
    s3 = s3_server.client()
    ciphertext = s3.get_object(Bucket=bucket, Key=status["evidence"]["key"])["Body"].read()
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=status["evidence"]["manifestKey"])["Body"].read())
    assert hashlib.sha256(ciphertext).hexdigest() == manifest["archive"]["sha256"] == status["evidence"]["sha256"]
    plaintext = gpg_keyring.decrypt(ciphertext)
    assert hashlib.sha256(plaintext).hexdigest() == manifest["archive"]["plaintextSha256"]
    with tarfile.open(fileobj=io.BytesIO(plaintext)) as archive:
        contents = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    assert {f["name"]: f["sha256"] for f in manifest["files"]} == {
        name: hashlib.sha256(data).hexdigest() for name, data in contents.items()
    }
    assert (manifest["incidentId"], manifest["reason"], manifest["requestedBy"]) == (
        "INC-2026-0042",
        "Suspected exfiltration of PHI through the api service",
        status["requestedBy"],
    )
    pods = json.loads(contents["pods.json"])
    assert {p["metadata"]["labels"]["app"] for p in pods} >= {"api", "frontend"}  # captured before scaling
    log_errors = json.loads(contents["log-errors.json"])
    read_logs = [n for n in contents if n.startswith("logs/")]
    # Every container's current and previous log is either in the archive or has a recorded reason.
    assert len(read_logs) + len(log_errors) == 2 * len(pods) and manifest["logErrors"] == log_errors
    assert log_errors["logs/ghost/shell.log"].startswith("HTTP 404")
    assert log_errors["logs/ghost/shell.previous.log"].startswith("HTTP 404")
    # The api pods' logs were read (a pending pod has an empty log) or, on a node without a kubelet to serve
    # them, the reason is recorded per container.
    assert any(name.startswith("logs/api-") for name in [*read_logs, *log_errors])
    assert {"replicasets.json", "events.json"} <= set(contents)

    labels = {"namespace": cluster.namespace}
    assert REGISTRY.get_sample_value("runbook_isolations_active", labels) == 1
    assert (REGISTRY.get_sample_value("runbook_isolation_time_to_contain_seconds_count") or 0) >= 1

    cluster.patch_spec("breach", {"released": True})
    wait_phase(cluster, wait_for, "breach", "Released")
    assert_released_exactly(cluster)
    assert REGISTRY.get_sample_value("runbook_isolations_active", labels) == 0
    assert cluster.policies()["allow-all"]["spec"] == allow_all_before["spec"]
    assert cluster.policies()["allow-all"]["metadata"]["labels"] == {"team": "web"}
    assert cluster.condition("breach", "Restored")["status"] == "True"
    assert cluster.condition("breach", "PoliciesRestored")["status"] == "True"
    assert (
        cluster.core.list_namespaced_config_map(cluster.namespace, label_selector="runbook.dev/isolation").items == []
    )

    reasons = {e.reason for e in cluster.events("breach")}
    assert {"Admitted", "NetworkContained", "PoliciesRemoved", "SnapshotRecorded", "EvidencePreserved"} <= reasons
    assert {"ScaledToZero", "WorkloadsRestored", "Released"} <= reasons
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "runbook.audit"]
    steps = {(a["event"], a["step"]) for a in audit if a["name"] == "breach"}
    assert {("isolation_applied", "network_contained"), ("isolation_applied", "scaled_to_zero")} <= steps
    assert ("isolation_released", "released") in steps
    assert all(a["compliance"] == "hipaa" and a["incidentId"] == "INC-2026-0042" for a in audit)

    # Deleting the resource leaves the evidence; no secret is anywhere the operator writes.
    cluster.delete_isolation("breach")
    wait_for(lambda: cluster.isolation("breach") is None, timeout=30, what="the isolation to go away")
    assert s3.head_object(Bucket=bucket, Key=status["evidence"]["key"])["ContentLength"] == len(ciphertext)
    written = json.dumps(
        [status, cluster.annotations(), [e.message for e in cluster.events("breach")], caplog.text, manifest]
    )
    assert s3_server.secret_key not in written and s3_server.access_key not in written
    cluster.core.delete_namespaced_pod("ghost", cluster.namespace, grace_period_seconds=0)  # no kubelet to end it


def test_existing_policies_are_listed_with_a_warning(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner, wait_for: Callable[..., Any]
) -> None:
    cluster.create_runbook_workloads()
    cluster.create_isolation("breach", breach_spec(None))
    wait_phase(cluster, wait_for, "breach", "Isolated")
    assert set(cluster.policies()) == {"allow-all", "emergency-isolate"}
    assert cluster.status("breach")["existingPolicies"] == ["allow-all"]
    condition = cluster.condition("breach", "ExistingPoliciesAllow")
    assert condition["status"] == "True" and "allow-all" in condition["message"]
    wait_for(
        lambda: any(e.type == "Warning" and e.reason == "ExistingPoliciesAllow" for e in cluster.events("breach")),
        timeout=15,
        what="the ExistingPoliciesAllow Warning Event",
    )
    cluster.delete_isolation("breach")
    wait_for(lambda: cluster.isolation("breach") is None, timeout=30, what="release on deletion")
    assert_released_exactly(cluster)


def test_resync_writes_nothing_and_a_removed_policy_comes_back(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner, wait_for: Callable[..., Any]
) -> None:
    cluster.create_runbook_workloads()
    cluster.create_isolation("breach", breach_spec(None, allowDNS=True, allowEgressTo=["10.20.0.0/16"]))
    wait_phase(cluster, wait_for, "breach", "Isolated")
    egress = cluster.policies()["emergency-isolate"]["spec"]["egress"]
    assert egress[1] == {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]}
    assert {p["protocol"] for p in egress[0]["ports"]} == {"UDP", "TCP"}

    def versions() -> dict[str, str]:
        """What the operator could write: a workload's spec, labels and annotations (its status, and so its
        resourceVersion, belongs to the controllers, which go on updating it after a scale-down), and the
        resourceVersion of the policies and of the isolation itself (nobody else writes those)."""
        workloads = [
            *cluster.apps.list_namespaced_deployment(cluster.namespace).items,
            *cluster.apps.list_namespaced_stateful_set(cluster.namespace).items,
            *cluster.batch.list_namespaced_cron_job(cluster.namespace).items,
        ]
        serialize = cluster.api.sanitize_for_serialization
        found = {
            w.metadata.name: json.dumps([serialize(w.spec), w.metadata.labels, w.metadata.annotations], sort_keys=True)
            for w in workloads
        }
        policies = cluster.net.list_namespaced_network_policy(cluster.namespace).items
        found.update({p.metadata.name: p.metadata.resource_version for p in policies})
        return {**found, "breach": (cluster.isolation("breach") or {})["metadata"]["resourceVersion"]}

    before = versions()
    resync = Context.of(isolation.ISOLATION, cluster.isolation("breach") or {}, kube.KubeApi())
    run_pass(resync, isolation.ISOLATION.reconcile)  # a resync, as after a restart
    assert versions() == before

    cluster.net.delete_namespaced_network_policy("emergency-isolate", cluster.namespace)
    wait_for(lambda: "emergency-isolate" in cluster.policies(), timeout=40, what="the policy to be put back")
    assert cluster.policies()["emergency-isolate"]["spec"]["egress"] == egress
    wait_for(  # kopf posts Events from a queue, a moment after the policy is back
        lambda: any(e.reason == "NetworkContained" and e.type == "Warning" for e in cluster.events("breach")),
        timeout=15,
        what="the Warning Event that the policy was put back",
    )
    cluster.delete_isolation("breach")
    wait_for(lambda: cluster.isolation("breach") is None, timeout=30, what="release on deletion")
    assert_released_exactly(cluster)


def test_a_policy_deleted_or_edited_by_hand_is_put_back_at_once_by_the_watch(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner, wait_for: Callable[..., Any]
) -> None:
    """The guard is a watch on the operator's policies, not a timer: each deletion (three in a row) and an
    edit are undone within a few seconds (a 10 s timer would miss that bound most of the time)."""
    cluster.create_runbook_workloads()
    cluster.create_isolation("breach", breach_spec(None))
    wait_phase(cluster, wait_for, "breach", "Isolated")
    desired = cluster.policies()["emergency-isolate"]["spec"]
    for attempt in range(3):
        before = cluster.policies()["emergency-isolate"]["metadata"]["uid"]
        cluster.net.delete_namespaced_network_policy("emergency-isolate", cluster.namespace)
        started = time.monotonic()
        wait_for(
            lambda: (
                cluster.policies().get("emergency-isolate", {}).get("metadata", {}).get("uid") not in (None, before)
            ),
            timeout=3,
            interval=0.05,
            what=f"the policy put back (deletion {attempt + 1})",
        )
        print(f"deletion {attempt + 1}: put back after {time.monotonic() - started:.3f} s")
        assert cluster.policies()["emergency-isolate"]["spec"] == desired
    cluster.net.patch_namespaced_network_policy(
        "emergency-isolate", cluster.namespace, {"spec": {"ingress": [{}], "egress": [{}]}}
    )
    wait_for(
        lambda: cluster.policies()["emergency-isolate"]["spec"] == desired,
        timeout=3,
        interval=0.05,
        what="the edited policy put back",
    )
    cluster.delete_isolation("breach")
    wait_for(lambda: cluster.isolation("breach") is None, timeout=30, what="release on deletion")
    assert_released_exactly(cluster)


def test_an_idle_isolation_makes_no_api_call(
    cluster: Cluster,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Isolated and left alone for 25 s (the old guard read, or wrote and got a 409, every 10 s): the operator
    makes no request of its own (``KubeApi``) about the namespace, neither read nor write; the watch knows."""
    cluster.create_runbook_workloads()
    cluster.create_isolation("breach", breach_spec(None, allowDNS=True))
    wait_phase(cluster, wait_for, "breach", "Isolated")
    calls: list[tuple[str, str]] = []
    call = kube.KubeApi._call

    def counted(self: kube.KubeApi, method: str, path: str, **kwargs: Any) -> Any:
        if f"/namespaces/{cluster.namespace}/" in path:
            calls.append((method, path))
        return call(self, method, path, **kwargs)

    time.sleep(3)  # the pass's last Event posts settle
    with monkeypatch.context() as patched:
        patched.setattr(kube.KubeApi, "_call", counted)
        time.sleep(25)
    assert calls == []
    assert "emergency-isolate" in cluster.policies()
    cluster.delete_isolation("breach")
    wait_for(lambda: cluster.isolation("breach") is None, timeout=30, what="release on deletion")
    assert_released_exactly(cluster)


def test_second_isolation_is_rejected_and_the_interlock_follows(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner, wait_for: Callable[..., Any]
) -> None:
    cluster.create_runbook_workloads()
    cluster.create_isolation("first", breach_spec(None))
    wait_phase(cluster, wait_for, "first", "Isolated")
    cluster.create_isolation("second", {**breach_spec(None), "incidentId": "INC-2026-0043"})
    wait_phase(cluster, wait_for, "second", "Rejected")
    ready = cluster.condition("second", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "AlreadyIsolated") and "first" in ready["message"]
    assert holder_by_listing(kube.KubeApi())(cluster.namespace) == "first"
    cluster.delete_isolation("second")  # deleting the rejected one changes nothing
    wait_for(lambda: cluster.isolation("second") is None, timeout=30, what="the rejected isolation to go away")
    assert cluster.replicas() == {**dict.fromkeys(REPLICAS, 0), **KEPT}
    cluster.patch_spec("first", {"released": True})
    wait_phase(cluster, wait_for, "first", "Released")
    assert holder_by_listing(kube.KubeApi())(cluster.namespace) is None
    assert_released_exactly(cluster)


def test_two_created_at_once_agree_on_one(
    cluster: Cluster, operator_process: OperatorProcess, wait_for: Callable[..., Any]
) -> None:
    cluster.create_runbook_workloads()
    cluster.create_isolation("alpha", breach_spec(None))
    cluster.create_isolation("bravo", breach_spec(None))
    operator_process.start()  # both are handled concurrently from the first listing
    wait_phase(cluster, wait_for, "alpha", "Isolated")
    wait_phase(cluster, wait_for, "bravo", "Rejected")
    owners = cluster.policies()["emergency-isolate"]["metadata"]["ownerReferences"]
    assert [o["name"] for o in owners] == ["alpha"]
    cluster.delete_isolation("bravo")
    cluster.delete_isolation("alpha")
    wait_for(lambda: cluster.isolation("alpha") is None, timeout=30, what="release on deletion")
    assert_released_exactly(cluster)


def test_contained_by_the_watch_while_kopfs_processing_is_stalled(
    cluster: Cluster, wait_for: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, namespace: str
) -> None:
    """kopf's event of a new isolation never gets to containment (its handler hangs there, as behind a full
    queue): the containment watch creates the policy anyway, within a second, once; isolatedAt follows."""
    stalled = threading.Event()

    async def hang(*_: Any, **__: Any) -> None:
        stalled.set()
        await asyncio.sleep(3600)

    monkeypatch.setattr(isolation, "contain_new", hang)
    monkeypatch.setattr(runbook_operator.main.SETTINGS, "containment_watch", True)
    with kopf.testing.KopfRunner(["run", "--standalone", "-m", "runbook_operator.main", "--namespace", namespace]):
        wait_for(lambda: containment.WATCHES and containment.WATCHES[0].listed.is_set(), timeout=30, what="listed")
        cluster.create_runbook_workloads()
        started = time.monotonic()
        cluster.create_isolation("breach", breach_spec(None))
        wait_for(lambda: "emergency-isolate" in cluster.policies(), timeout=10, interval=0.02, what="policy")
        took = time.monotonic() - started
        wait_for(stalled.is_set, timeout=10, what="kopf's handler reached (and stalled)")
        wait_for(lambda: (cluster.isolation("breach") or {}).get("status", {}).get("isolatedAt"), timeout=10)
        policy = cluster.policies()["emergency-isolate"]
        assert [o["name"] for o in policy["metadata"]["ownerReferences"]] == ["breach"]
        assert [m["manager"] for m in policy["metadata"]["managedFields"]] == ["runbook-operator"]
        assert containment.WATCHES[0].failures == 0
        cluster.delete_isolation("breach")
        wait_for(lambda: cluster.isolation("breach") is None, timeout=30, what="deleted")
    assert took < 1.0, f"the watch contained after {took:.2f}s"


def test_symmetric_evidence_decrypts_with_the_passphrase_which_never_leaks(
    cluster: Cluster,
    evidence_store: dict[str, Any],
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    passphrase = "evidence-passphrase-" + uuid.uuid4().hex
    cluster.core.create_namespaced_secret(
        cluster.namespace, {"metadata": {"name": "evidence-gpg"}, "stringData": {"passphrase": passphrase}}
    )
    evidence_store["encryption"] = {"gpg": {"passphraseSecretRef": {"name": "evidence-gpg", "key": "passphrase"}}}
    cluster.create_runbook_workloads()
    cluster.create_isolation("breach", breach_spec(evidence_store))
    wait_phase(cluster, wait_for, "breach", "Isolated")
    status = cluster.status("breach")
    bucket = evidence_store["destination"]["bucket"]
    s3 = s3_server.client()
    ciphertext = s3.get_object(Bucket=bucket, Key=status["evidence"]["key"])["Body"].read()
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=status["evidence"]["manifestKey"])["Body"].read())
    assert manifest["archive"]["encryption"]["method"] == "symmetric"
    plaintext = gpg_keyring.decrypt(ciphertext, passphrase=passphrase)  # stock gpg, as the runbook restores
    assert hashlib.sha256(plaintext).hexdigest() == manifest["archive"]["plaintextSha256"]
    cluster.patch_spec("breach", {"released": True})
    wait_phase(cluster, wait_for, "breach", "Released")
    written = json.dumps(
        [
            cluster.isolation("breach"),
            cluster.annotations(),
            [e.message for e in cluster.core.list_namespaced_event(cluster.namespace).items],
            caplog.text,
            manifest,
        ]
    )
    assert passphrase not in written and s3_server.secret_key not in written


def test_api_server_refuses_undoing_a_release_and_changing_the_snapshot_scope(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner, wait_for: Callable[..., Any]
) -> None:
    cluster.create_isolation("breach", {**breach_spec(None), "released": True})
    wait_phase(cluster, wait_for, "breach", "Released")
    with pytest.raises(kubernetes.client.ApiException) as caught:
        cluster.patch_spec("breach", {"released": False})
    assert caught.value.status == 422 and "released cannot be undone" in caught.value.body
    with pytest.raises(kubernetes.client.ApiException) as caught:
        cluster.patch_spec("breach", {"scaleToZero": {"enabled": False}})
    assert "scaleToZero is immutable" in caught.value.body


# --- bad inputs ------------------------------------------------------------------------------------------


def test_invalid_keep_running_selector_changes_nothing(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner, wait_for: Callable[..., Any]
) -> None:
    cluster.create_runbook_workloads()
    spec = {**breach_spec(None), "scaleToZero": {"keepRunning": {"matchLabels": {"app name": "postgresql"}}}}
    cluster.create_isolation("breach", spec)
    wait_phase(cluster, wait_for, "breach", "Invalid")
    ready = cluster.condition("breach", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["message"].startswith("spec.scaleToZero: keepRunning.matchLabels")
    wait_for(
        lambda: any(e.type == "Warning" and e.reason == "InvalidSpec" for e in cluster.events("breach")),
        timeout=15,
        what="the InvalidSpec Warning Event",
    )
    assert cluster.replicas() == {**REPLICAS, **KEPT} and "emergency-isolate" not in cluster.policies()
    assert all(SNAPSHOT_ANNOTATION not in a for a in cluster.annotations().values())
    assert holder_by_listing(kube.KubeApi())(cluster.namespace) is None  # an isolation that never acted holds nothing


@pytest.mark.parametrize("missing", ["secret", "bucket"])
def test_missing_evidence_store_contains_but_does_not_scale(
    cluster: Cluster,
    evidence_store: dict[str, Any],
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
    missing: str,
) -> None:
    cluster.create_runbook_workloads()
    if missing == "secret":
        cluster.core.delete_namespaced_secret(S3_SECRET, cluster.namespace)
        expected = ("SecretNotFound", "spec.evidence.destination.credentialsSecretRef: Secret evidence-s3 not found")
    else:
        evidence_store["destination"]["bucket"] = "no-such-bucket"
        expected = ("BucketNotFound", "spec.evidence.destination.bucket: bucket no-such-bucket not found")
    cluster.create_isolation("breach", breach_spec(evidence_store))
    wait_for(lambda: cluster.condition("breach", "EvidencePreserved").get("reason") == expected[0], what=expected[0])
    ready = cluster.condition("breach", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", expected[0])
    assert ready["message"].startswith(expected[1]) and "nothing is scaled" in ready["message"]
    assert cluster.status("breach")["phase"] == "Contained"
    assert "emergency-isolate" in cluster.policies()  # contained: undoable
    assert cluster.replicas() == {**REPLICAS, **KEPT} and not cluster.cronjob_suspended()  # fail closed
    cluster.patch_spec("breach", {"released": True})
    wait_phase(cluster, wait_for, "breach", "Released")
    assert_released_exactly(cluster)
    assert cluster.condition("breach", "Restored")["status"] == "True"  # nothing was stopped: no false alarm


def test_evidence_retries_count_on_one_event_instead_of_adding_events(
    cluster: Cluster,
    evidence_store: dict[str, Any],
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    """Required evidence that cannot be captured is retried every 10 s: each retry counts on the same
    Warning Event (as kubelet repeats), not a new Event each time (about 360 an hour)."""
    evidence_store["destination"]["bucket"] = "no-such-bucket"
    cluster.create_isolation("breach", breach_spec(evidence_store))

    def warnings() -> list[Any]:
        return [e for e in cluster.events("breach") if e.reason == "BucketNotFound"]

    wait_for(lambda: any((e.count or 1) >= 3 for e in warnings()), timeout=60, what="the third attempt")
    [event] = warnings()
    assert event.type == "Warning" and event.count >= 3 and event.last_timestamp > event.first_timestamp


def test_evidence_secret_created_late_is_picked_up(
    cluster: Cluster,
    evidence_store: dict[str, Any],
    s3_server: S3Server,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    cluster.core.delete_namespaced_secret(S3_SECRET, cluster.namespace)
    cluster.create_runbook_workloads()
    cluster.create_isolation("breach", breach_spec(evidence_store))
    wait_for(lambda: cluster.condition("breach", "EvidencePreserved").get("reason") == "SecretNotFound", what="failure")
    cluster.core.create_namespaced_secret(
        cluster.namespace,
        {
            "metadata": {"name": S3_SECRET},
            "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
        },
    )
    wait_phase(cluster, wait_for, "breach", "Isolated", timeout=30)  # retried within 10 s
    assert cluster.condition("breach", "EvidencePreserved")["status"] == "True"
    assert cluster.replicas() == {**dict.fromkeys(REPLICAS, 0), **KEPT}


def test_empty_namespace_is_contained_and_says_so(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner, wait_for: Callable[..., Any]
) -> None:
    cluster.create_isolation("breach", breach_spec(None))
    wait_phase(cluster, wait_for, "breach", "Isolated")
    condition = cluster.condition("breach", "WorkloadsStopped")
    assert (condition["status"], condition["reason"]) == ("False", "NoWorkloads")
    assert cluster.status("breach")["scaled"] == "0/0" and "emergency-isolate" in cluster.policies()
    cluster.delete_isolation("breach")
    wait_for(lambda: cluster.isolation("breach") is None, timeout=30, what="release on deletion")
    assert cluster.policies() == {}


def test_release_does_not_fight_changes_made_by_hand(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner, wait_for: Callable[..., Any]
) -> None:
    cluster.create_runbook_workloads()
    cluster.create_isolation("breach", breach_spec(None))
    wait_phase(cluster, wait_for, "breach", "Isolated")
    cluster.apps.delete_namespaced_deployment("frontend", cluster.namespace)
    # (backend: api has an HPA with minReplicas 2, whose controller would raise a hand-set 1 on its own)
    cluster.apps.patch_namespaced_deployment("backend", cluster.namespace, {"spec": {"replicas": 1}})
    cluster.patch_spec("breach", {"released": True})
    wait_phase(cluster, wait_for, "breach", "Released")
    expected = {**REPLICAS, **KEPT, "backend": 1}
    del expected["frontend"]
    assert cluster.replicas() == expected and not cluster.cronjob_suspended()
    restored = cluster.condition("breach", "Restored")
    assert (restored["status"], restored["reason"]) == ("False", "ChangedDuringIsolation")
    assert "Deployment frontend was deleted" in restored["message"]
    assert "Deployment backend was changed by hand during the isolation (now 1)" in restored["message"]
    wait_for(
        lambda: any(e.type == "Warning" and e.reason == "ChangedDuringIsolation" for e in cluster.events("breach")),
        timeout=15,
        what="the ChangedDuringIsolation Warning Event",
    )
    assert all(SNAPSHOT_ANNOTATION not in a for a in cluster.annotations().values())


def test_release_is_exact_even_if_status_was_lost(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner, wait_for: Callable[..., Any]
) -> None:
    cluster.create_runbook_workloads()
    cluster.create_isolation("breach", breach_spec(None))
    wait_phase(cluster, wait_for, "breach", "Isolated")
    cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, cluster.namespace, PLURAL, "breach", {"status": {"snapshot": None}}
    )
    assert "snapshot" not in cluster.status("breach")
    cluster.patch_spec("breach", {"released": True})
    wait_phase(cluster, wait_for, "breach", "Released")
    assert_released_exactly(cluster)  # from the annotations on the workloads


# --- crash safety: the operator as a process, killed ---------------------------------------------------


class Tarpit:
    """A TCP port that first holds every connection unanswered (the operator hangs inside the evidence
    upload), then relays to the real S3 API server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.forwarding = threading.Event()
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.forwarding.is_set():
                self.held.append(client)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def forward(self) -> None:
        self.forwarding.set()
        for held in self.held:
            held.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def operator_process(operator_kubeconfig: Path, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    operator = OperatorProcess(operator_kubeconfig, namespace, tmp_path / "operator.log")
    try:
        yield operator
    finally:
        operator.stop()


def test_killed_after_snapshot_before_scaling_converges_and_releases_exactly(
    cluster: Cluster,
    evidence_store: dict[str, Any],
    s3_server: S3Server,
    operator_process: OperatorProcess,
    wait_for: Callable[..., Any],
) -> None:
    cluster.create_runbook_workloads()
    tarpit = Tarpit(s3_server.port)
    try:
        evidence_store["destination"]["endpoint"] = tarpit.endpoint
        grant(cluster.api, cluster.namespace, endpoints=[tarpit.endpoint])  # the test's own S3 endpoint
        cluster.create_isolation("breach", breach_spec(evidence_store))
        operator_process.start()

        def snapshot_written() -> bool:
            annotations = cluster.annotations()
            return bool(cluster.status("breach").get("snapshot")) and all(
                SNAPSHOT_ANNOTATION in annotations[name] for name in REPLICAS
            )

        wait_for(snapshot_written, timeout=60, what="the snapshot")
        wait_for(lambda: tarpit.held, timeout=30, what="the evidence upload to start")
        operator_process.kill()
        assert cluster.replicas() == {**REPLICAS, **KEPT} and not cluster.cronjob_suspended()
        assert "emergency-isolate" in cluster.policies()

        tarpit.forward()
        operator_process.start()
        wait_phase(cluster, wait_for, "breach", "Isolated", timeout=120)
        assert cluster.replicas() == {**dict.fromkeys(REPLICAS, 0), **KEPT} and cluster.cronjob_suspended()
        recorded = {s["name"]: s.get("replicas") for s in cluster.status("breach")["snapshot"]}
        assert {n: recorded[n] for n in REPLICAS} == REPLICAS  # the second pass reused, not re-read zeros

        cluster.patch_spec("breach", {"released": True})
        wait_phase(cluster, wait_for, "breach", "Released")
        assert_released_exactly(cluster)
    finally:
        tarpit.close()


def test_deleted_while_the_operator_is_down_is_released_when_it_returns(
    cluster: Cluster, operator_process: OperatorProcess, wait_for: Callable[..., Any]
) -> None:
    cluster.create_runbook_workloads()
    cluster.create_isolation("breach", breach_spec(None, overrideExistingPolicies=True))
    operator_process.start()
    wait_phase(cluster, wait_for, "breach", "Isolated")
    operator_process.kill()

    cluster.delete_isolation("breach")
    body = cluster.isolation("breach")
    assert body is not None and body["metadata"]["deletionTimestamp"]  # held by the finalizer
    assert cluster.replicas() == {**dict.fromkeys(REPLICAS, 0), **KEPT}

    operator_process.start()
    wait_for(lambda: cluster.isolation("breach") is None, timeout=60, what="release on deletion")
    assert_released_exactly(cluster)
    assert cluster.policies()["allow-all"]["spec"] == ALLOW_ALL


def test_operator_needs_nothing_beyond_its_cluster_role(
    cluster: Cluster,
    evidence_store: dict[str, Any],
    operator_kubeconfig: Path,
    tmp_path: Path,
    wait_for: Callable[..., Any],
) -> None:
    """The whole isolation, evidence and release, by an operator process holding only deploy/'s RBAC (its
    ServiceAccount's token): no request of ours is forbidden."""
    operator = OperatorProcess(operator_kubeconfig, cluster.namespace, tmp_path / "operator.log")
    cluster.create_runbook_workloads()
    cluster.create_isolation("breach", breach_spec(evidence_store, overrideExistingPolicies=True))
    operator.start()
    try:
        wait_phase(cluster, wait_for, "breach", "Isolated")
        assert cluster.status("breach")["evidence"]["key"]
        assert cluster.replicas() == {**dict.fromkeys(REPLICAS, 0), **KEPT}
        cluster.delete_isolation("breach")
        wait_for(lambda: cluster.isolation("breach") is None, timeout=60, what="release on deletion")
    finally:
        operator.stop()
    assert_released_exactly(cluster)
    assert cluster.policies()["allow-all"]["spec"] == ALLOW_ALL
    assert "forbidden" not in (tmp_path / "operator.log").read_text().lower()
