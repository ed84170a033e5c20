"""What deploy/ ships and the pods the operator makes, as the scanners (kube-score, checkov) read them."""

from __future__ import annotations

from typing import Any

import yaml

from runbook_operator.builders.backup import agent_pod_spec
from runbook_operator.models.backup import KUBERNETES_RESOURCES
from tests.helpers import ROOT

DEPLOY = ROOT / "deploy" / "base"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def cluster_role() -> dict[str, Any]:
    return next(d for d in documents("rbac.yaml") if d["kind"] == "ClusterRole")


def test_export_rules_grant_exact_group_resource_pairs() -> None:
    """The read access a Kubernetes export needs, rule by rule, is exactly KUBERNETES_RESOURCES: no rule
    crosses several groups (which granted meaningless pairs such as `secrets` in `apps`)."""
    exportable = {(group, plural) for plural, (group, _, _) in KUBERNETES_RESOURCES.items()}
    readable = {
        (group, resource)
        for rule in cluster_role()["rules"]
        if sorted(rule["verbs"]) == ["get", "list"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert exportable <= readable
    for rule in cluster_role()["rules"]:
        assert len(rule["apiGroups"]) == 1 or rule["resources"] == ["events"], rule


def test_server_side_applied_kinds_may_be_created() -> None:
    """An apply that creates the object needs `create`: the reconcilers apply CronJobs, ServiceAccounts,
    Roles and RoleBindings."""
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in cluster_role()["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    for pair in [
        ("batch", "cronjobs"),
        ("", "serviceaccounts"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
    ]:
        assert {"create", "patch"} <= granted[pair], pair


def test_operator_deployment_has_readiness_and_liveness_probes_and_limits() -> None:
    deployment = next(d for d in documents("deployment.yaml") if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["port"] == "health"
    assert container["livenessProbe"]["httpGet"]["port"] == "health"
    assert {"cpu", "memory", "ephemeral-storage"} <= set(container["resources"]["limits"])
    assert {"cpu", "memory", "ephemeral-storage"} <= set(container["resources"]["requests"])


def test_agent_pods_have_cpu_memory_and_ephemeral_storage_limits() -> None:
    """Every CronJob and Job pod the operator makes is built by agent_pod_spec."""
    pod = agent_pod_spec(container="agent", image="image:1", args=[], env=[])
    resources = pod["containers"][0]["resources"]
    for section in ("requests", "limits"):
        assert set(resources[section]) == {"cpu", "memory", "ephemeral-storage"}


def test_the_quick_start_apply_does_not_isolate_the_namespace() -> None:
    """`kubectl apply -f deploy/samples/` (not recursive) must not apply the breach response."""
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in (ROOT / "deploy" / "samples").glob("*.yaml")}
    assert "EmergencyIsolation" not in kinds
    assert (ROOT / "deploy/samples/incident/emergencyisolation.yaml").is_file()


def test_restore_cluster_roles_grant_apply_on_exactly_the_exportable_resources() -> None:
    """The Kubernetes restore Job's ClusterRoles: get/create/patch on exactly KUBERNETES_RESOURCES, Secrets
    only in the second; the operator may bind exactly these two and holds no write access of its own."""
    roles = {d["metadata"]["name"]: d["rules"] for d in documents("restore-rbac.yaml") if d["kind"] == "ClusterRole"}
    granted = {
        name: {(group, resource) for rule in rules for group in rule["apiGroups"] for resource in rule["resources"]}
        for name, rules in roles.items()
    }
    exportable = {(group, plural) for plural, (group, _, _) in KUBERNETES_RESOURCES.items()}
    assert granted == {
        "runbook-operator-restore-kubernetes": exportable - {("", "secrets")},
        "runbook-operator-restore-kubernetes-secrets": {("", "secrets")},
    }
    for rules in roles.values():
        assert all(
            sorted(rule["verbs"]) == ["create", "get", "patch"] and len(rule["apiGroups"]) == 1 for rule in rules
        )
    binds = [r for r in cluster_role()["rules"] if "bind" in r["verbs"]]
    assert binds == [
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterroles"],
            "verbs": ["bind"],
            "resourceNames": sorted(roles),
        }
    ]
