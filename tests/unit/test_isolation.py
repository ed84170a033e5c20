"""EmergencyIsolation's pure parts: the policy, the snapshot, the patches, the archive and the spec checks."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from runbook_operator.builders.isolation import (
    POLICY_NAME,
    SNAPSHOT_ANNOTATION,
    FileDigest,
    annotate_patch,
    build_network_policy,
    checked_policy,
    custody_manifest,
    is_stopped,
    policy_for_recreation,
    recorded_snapshot,
    requested_by,
    restore_patch,
    save_policy,
    scaled_summary,
    snapshot_workloads,
    stop_patch,
)
from runbook_operator.errors import RunbookError, parse_spec
from runbook_operator.models.isolation import EmergencyIsolationSpec, NetworkIsolation, SavedPolicy, WorkloadSnapshot
from runbook_operator.reconcilers.isolation import time_to_contain

OWNER = {"apiVersion": "runbook.dev/v1alpha1", "kind": "EmergencyIsolation", "name": "breach", "uid": "u-1"}
UID = "u-1"


def workload(kind: str, name: str, app: str, **spec: Any) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "labels": {"app": app}}, "spec": spec}


def keep_default() -> Any:
    return EmergencyIsolationSpec.model_validate({"reason": "r", "incidentId": "I-1"}).scale_to_zero.keep_running


def test_policy_is_the_runbooks_deny_all() -> None:
    policy = build_network_policy(NetworkIsolation(), namespace="ns", owner=OWNER)
    assert policy["metadata"]["name"] == POLICY_NAME == "emergency-isolate"
    assert policy["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert policy["metadata"]["ownerReferences"] == [OWNER]
    assert policy["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "runbook-operator"


def test_policy_allows_dns_and_cidrs_only_as_asked() -> None:
    network = NetworkIsolation.model_validate({"allowDNS": True, "allowEgressTo": ["10.0.0.0/8"]})
    egress = build_network_policy(network, namespace="ns", owner=OWNER)["spec"]["egress"]
    assert egress[0]["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    assert egress[0]["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert egress[1] == {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}
    assert "ingress" not in build_network_policy(network, namespace="ns", owner=OWNER)["spec"]


def test_snapshot_records_replicas_hpa_and_suspend_and_keeps_the_database() -> None:
    workloads = [
        workload("Deployment", "api", "api", replicas=4),
        workload("StatefulSet", "postgresql", "postgresql", replicas=1),
        workload("CronJob", "report", "report", suspend=False),
    ]
    hpas = [
        {
            "metadata": {"name": "api"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "api"}, "minReplicas": 2, "maxReplicas": 10},
        }
    ]
    entries = {e.name: e for e in snapshot_workloads(workloads, hpas, keep_default(), uid=UID, previous=[])}
    assert (entries["api"].replicas, entries["api"].hpa, entries["api"].hpa_min_replicas) == (4, "api", 2)
    assert entries["api"].hpa_max_replicas == 10 and not entries["api"].kept
    assert entries["postgresql"].kept and entries["postgresql"].replicas == 1
    assert entries["report"].suspend is False and entries["report"].replicas is None


def test_second_pass_never_overwrites_the_snapshot_with_zeros() -> None:
    first = snapshot_workloads(
        [workload("Deployment", "api", "api", replicas=4)], [], keep_default(), uid=UID, previous=[]
    )
    scaled = workload("Deployment", "api", "api", replicas=0)
    # From status:
    again = snapshot_workloads([scaled], [], keep_default(), uid=UID, previous=first)
    assert again[0].replicas == 4
    # Status lost: from the workload's own annotation.
    scaled["metadata"]["annotations"] = annotate_patch(first[0], isolation="breach", uid=UID)["metadata"]["annotations"]
    again = snapshot_workloads([scaled], [], keep_default(), uid=UID, previous=[])
    assert again[0].replicas == 4
    # Another isolation's annotation is not ours.
    assert recorded_snapshot(scaled, uid="someone-else") is None


def test_snapshot_keeps_entries_of_deleted_workloads() -> None:
    first = snapshot_workloads(
        [workload("Deployment", "api", "api", replicas=4)], [], keep_default(), uid=UID, previous=[]
    )
    assert snapshot_workloads([], [], keep_default(), uid=UID, previous=first) == first


def test_stop_and_restore_patches() -> None:
    deployment = WorkloadSnapshot(kind="Deployment", name="api", replicas=4)
    cronjob = WorkloadSnapshot(kind="CronJob", name="report", suspend=False)
    assert stop_patch(deployment) == {"spec": {"replicas": 0}}
    assert stop_patch(cronjob) == {"spec": {"suspend": True}}
    assert restore_patch(deployment, restore_spec=True) == {
        "metadata": {"annotations": {SNAPSHOT_ANNOTATION: None}},
        "spec": {"replicas": 4},
    }
    assert restore_patch(cronjob, restore_spec=True)["spec"] == {"suspend": False}
    assert "spec" not in restore_patch(deployment, restore_spec=False)
    assert is_stopped(deployment, {"spec": {"replicas": 0}}) and not is_stopped(deployment, {"spec": {"replicas": 2}})
    assert is_stopped(cronjob, {"spec": {"suspend": True}}) and not is_stopped(cronjob, {"spec": {}})


def test_scaled_summary_counts_deployments_and_statefulsets() -> None:
    entries = [
        WorkloadSnapshot(kind="Deployment", name="api", replicas=4),
        WorkloadSnapshot(kind="StatefulSet", name="redis", replicas=1, kept=True),
        WorkloadSnapshot(kind="CronJob", name="report", suspend=False),
    ]
    assert scaled_summary(entries, scaled=True) == "1/2"
    assert scaled_summary(entries, scaled=False) == "0/2"


def test_saved_policies_round_trip_without_server_fields() -> None:
    policy = {
        "metadata": {
            "name": "allow-all",
            "namespace": "ns",
            "uid": "x",
            "resourceVersion": "7",
            "managedFields": [],
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "generation": 1,
            "labels": {"team": "web"},
            "ownerReferences": [{"kind": "Thing", "name": "x", "uid": "y"}],
            "finalizers": ["example.com/x"],
        },
        "spec": {"podSelector": {}, "ingress": [{}]},
    }
    saved = save_policy(policy)
    assert saved.name == "allow-all"
    restored = checked_policy(saved, namespace="ns")
    assert restored == policy_for_recreation(policy)
    assert restored["metadata"] == {"name": "allow-all", "namespace": "ns", "labels": {"team": "web"}}


ALLOW_FROM_WEB = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "allow-web", "namespace": "ns"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "api"}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 8080}]}],
    },
}


def test_a_saved_policy_is_checked_strictly_before_it_is_recreated() -> None:
    def problem(name: str = "allow-web", **changes: Any) -> str:
        document = {**ALLOW_FROM_WEB, **changes}
        with pytest.raises(ValueError) as refused:
            checked_policy(SavedPolicy(name=name, manifest=json.dumps(document)), namespace="ns")
        return str(refused.value)

    assert checked_policy(SavedPolicy(name="allow-web", manifest=json.dumps(ALLOW_FROM_WEB)), namespace="ns") == (
        ALLOW_FROM_WEB
    )
    assert problem(name="other") == "metadata.name is not other"
    assert problem(metadata={"name": "allow-web", "namespace": "kube-system"}) == "metadata.namespace is not ns"
    assert problem(kind="ClusterRoleBinding") == "not a networking.k8s.io/v1 NetworkPolicy"
    assert problem(metadata={"name": "allow-web", "ownerReferences": []}) == (
        "metadata.ownerReferences is not a field it may have"
    )
    assert problem(spec={"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "x": 1}]}) == (
        "spec.egress[0].x is not a field it may have"
    )
    assert problem(spec={"podSelector": {}, "ingress": [{"from": [{"serviceAccount": "a"}]}]}) == (
        "spec.ingress[0].from[0].serviceAccount is not a field it may have"
    )
    assert problem(spec={"podSelector": {}, "policyTypes": ["Everything"]}).startswith("spec.policyTypes")
    assert problem(spec={"ingress": []}) == "spec.podSelector is missing"
    assert problem(status={}) == "manifest.status is not a field it may have"
    with pytest.raises(ValueError, match="not JSON"):
        checked_policy(SavedPolicy(name="allow-web", manifest="{"), namespace="ns")


def test_requested_by_is_the_first_manager_of_the_spec() -> None:
    metadata = {
        "managedFields": [
            {"manager": "runbook-operator", "operation": "Update", "time": "2026-01-01T00:00:02Z", "fieldsV1": {}},
            {
                "manager": "kubectl-create",
                "operation": "Update",
                "time": "2026-01-01T00:00:00Z",
                "fieldsV1": {"f:spec": {}},
            },
        ]
    }
    assert requested_by(metadata) == "kubectl-create"
    assert requested_by({}) == "unknown"


def test_custody_manifest_names_incident_requester_and_hashes() -> None:
    body = {
        "metadata": {"namespace": "ns", "name": "breach", "uid": UID},
        "spec": {"incidentId": "INC-1", "reason": "exfiltration", "severity": "P1"},
    }
    digests = [FileDigest("a", 1, hashlib.sha256(b"1").hexdigest())]
    manifest = custody_manifest(
        body=body,
        requester="kubectl-create",
        archive_key="k",
        archive_sha256="ab",
        archive_size=3,
        tar_sha256="cd",
        files=digests,
        encryption={"method": "public-key"},
        times={"requested": "t0"},
        log_errors={"logs/p/c.log": "HTTP 404"},
    )
    assert (manifest["incidentId"], manifest["requestedBy"], manifest["reason"]) == (
        "INC-1",
        "kubectl-create",
        "exfiltration",
    )
    assert manifest["archive"]["sha256"] == "ab" and manifest["files"][0]["sha256"] == hashlib.sha256(b"1").hexdigest()
    json.dumps(manifest)


@pytest.mark.parametrize(
    ("keep", "field"),
    [
        ({"matchExpressions": [{"key": "app name", "operator": "Exists"}]}, "matchExpressions[0].key"),
        (
            {"matchExpressions": [{"key": "app", "operator": "In", "values": ["post gres"]}]},
            "matchExpressions[0].values",
        ),
        ({"matchLabels": {"app": "-bad-"}}, "matchLabels"),
    ],
)
def test_invalid_keep_running_selector_is_named(keep: dict[str, Any], field: str) -> None:
    with pytest.raises(RunbookError) as caught:
        parse_spec(EmergencyIsolationSpec, {"reason": "r", "incidentId": "I-1", "scaleToZero": {"keepRunning": keep}})
    assert caught.value.reason == "InvalidSpec"
    assert caught.value.message.startswith(f"spec.scaleToZero: keepRunning.{field}")


def test_valid_keep_running_selector_with_prefix_is_accepted() -> None:
    spec = {
        "reason": "r",
        "incidentId": "I-1",
        "scaleToZero": {"keepRunning": {"matchLabels": {"app.kubernetes.io/name": "db"}}},
    }
    assert parse_spec(EmergencyIsolationSpec, spec).scale_to_zero.keep_running.matches({"app.kubernetes.io/name": "db"})


# --- time to contain ----------------------------------------------------------------------------------------


def test_time_to_contain_starts_when_the_operator_got_the_object_within_its_creation_second() -> None:
    """creationTimestamp has whole seconds: an object created at 12:00:00.900 reads 12:00:00, and measuring
    from there reported 0.93 s for a containment that took 30 ms."""
    created = "2026-12-01T12:00:00Z"
    start = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    seen, contained = start + 0.900, start + 0.930
    assert time_to_contain(created, seen=seen, contained=contained) == pytest.approx(0.030)


def test_time_to_contain_starts_at_creation_when_the_operator_got_the_object_later() -> None:
    """Created while the operator was down: the wait counts from creationTimestamp (up to 1 s too early)."""
    created = "2026-12-01T12:00:00Z"
    start = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    assert time_to_contain(created, seen=start + 42.5, contained=start + 42.6) == pytest.approx(42.6)
    # A clock slightly behind the API server's: never negative, never from before the creation second.
    assert time_to_contain(created, seen=start - 0.2, contained=start - 0.1) == 0.0
