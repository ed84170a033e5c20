"""What deploy/ ships and the pods the operator makes, as the scanners (kube-score, checkov) read them."""

from __future__ import annotations

from typing import Any

import yaml

from runbook_operator.builders.backup import EXPORT_SECRETS_SERVICE_ACCOUNT, EXPORT_SERVICE_ACCOUNT, agent_pod_spec
from runbook_operator.builders.restore_kubernetes import RESTORE_SECRETS_SERVICE_ACCOUNT, RESTORE_SERVICE_ACCOUNT
from runbook_operator.models.backup import KUBERNETES_RESOURCES
from tests.helpers import ROOT

DEPLOY = ROOT / "deploy" / "base"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


OPERATOR_ROLES = ("runbook-operator", "runbook-operator-namespace")
FORBIDDEN_VERBS = {"update", "escalate", "bind", "impersonate", "*"}


def cluster_roles(name: str) -> dict[str, list[dict[str, Any]]]:
    return {d["metadata"]["name"]: d["rules"] for d in documents(name) if d["kind"] == "ClusterRole"}


def cluster_role(name: str = "runbook-operator-namespace") -> dict[str, Any]:
    return {"rules": cluster_roles("rbac.yaml")[name]}


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_operator_roles_are_split_and_every_rule_has_its_reason() -> None:
    """Two ClusterRoles: the cluster-wide one and the namespaced one; every rule below a comment giving its
    reason; no rule crosses several groups (which granted meaningless pairs such as `secrets` in `apps`)."""
    assert sorted(cluster_roles("rbac.yaml")) == sorted(OPERATOR_ROLES)
    text = (DEPLOY / "rbac.yaml").read_text().splitlines()
    rule_lines = [i for i, line in enumerate(text) if line.startswith("  - apiGroups:")]
    leader = [d["rules"] for d in documents("rbac.yaml") if d["kind"] == "Role"]  # the Lease's (leader.py)
    assert len(rule_lines) == sum(len(r) for r in [*cluster_roles("rbac.yaml").values(), *leader])
    for index in rule_lines:
        assert text[index - 1].strip().startswith("#"), f"deploy/base/rbac.yaml line {index + 1} has no reason"
    for rules in cluster_roles("rbac.yaml").values():
        for rule in rules:
            assert len(rule["apiGroups"]) == 1 or rule["resources"] == ["events"], rule


def test_operator_holds_no_secret_list_no_update_and_nothing_that_escalates() -> None:
    """No `list`/`watch` of Secrets, no `update` (the code only patches), no escalate/bind/impersonate, no
    pods/exec; replicas only through /scale; the fixed names by resourceNames."""
    for name, rules in cluster_roles("rbac.yaml").items():
        granted = grants(rules)
        assert not ({"list", "watch"} & granted.get(("", "secrets"), set())), name
        assert all(not (FORBIDDEN_VERBS & set(r["verbs"])) for r in rules), name
        assert not {("", "pods/exec"), ("", "pods/attach"), ("", "serviceaccounts/token")} & set(granted), name
        assert not any(group == "rbac.authorization.k8s.io" for group, _ in granted), name
    namespaced = cluster_roles("rbac.yaml")["runbook-operator-namespace"]
    fixed = {
        (r["resources"][0], tuple(r["resourceNames"])): sorted(r["verbs"]) for r in namespaced if "resourceNames" in r
    }
    assert fixed[("networkpolicies", ("emergency-isolate",))] == ["get", "patch"]
    assert {"deployments/scale", "statefulsets/scale"} <= {p for (_, p) in grants(namespaced)}
    # a point-in-time restore's claim: read, and created for mode NewVolume; never changed or deleted
    assert grants(namespaced)[("", "persistentvolumeclaims")] == {"get", "create"}
    cluster_wide = grants(cluster_roles("rbac.yaml")["runbook-operator"])
    assert all(
        group in {"", "apiextensions.k8s.io", "events.k8s.io", "runbook.dev", "batch", "networking.k8s.io"}
        for group, _ in cluster_wide
    )
    assert cluster_wide[("batch", "jobs")] == {"list", "watch"}
    assert cluster_wide[("networking.k8s.io", "networkpolicies")] == {"list", "watch"}  # the isolation guard's watch
    assert not {("", "secrets"), ("", "configmaps"), ("apps", "deployments")} & set(cluster_wide)


def test_agent_roles_cover_exactly_the_exportable_resources() -> None:
    """The export's read and the restore's apply access, rule by rule, is exactly KUBERNETES_RESOURCES,
    Secrets in ClusterRoles of their own."""
    exportable = {(group, plural) for plural, (group, _, _) in KUBERNETES_RESOURCES.items()}
    roles = cluster_roles("agent-rbac.yaml")
    granted = {name: grants(rules) for name, rules in roles.items()}
    secrets = {("", "secrets")}
    assert {name: set(pairs) for name, pairs in granted.items()} == {
        "runbook-operator-export": exportable - secrets,
        "runbook-operator-export-secrets": secrets,
        "runbook-operator-restore-kubernetes": exportable - secrets,
        "runbook-operator-restore-kubernetes-secrets": secrets,
    }
    for name, rules in roles.items():
        verbs = ["get", "list"] if "export" in name else ["create", "get", "patch"]
        assert all(sorted(rule["verbs"]) == verbs and len(rule["apiGroups"]) == 1 for rule in rules), name


def test_server_side_applied_kinds_may_be_created() -> None:
    """An apply that creates the object needs `create`: the reconcilers apply CronJobs and HPAs."""
    granted = grants(cluster_role()["rules"])
    for pair in [("batch", "cronjobs"), ("autoscaling", "horizontalpodautoscalers"), ("apps", "deployments")]:
        assert {"create", "patch"} <= granted[pair], pair


def test_enabling_bundle_binds_the_operator_and_names_the_agents_service_accounts() -> None:
    """deploy/base/namespace-enable/: the operator's RoleBinding to its namespaced role, and each agent
    ServiceAccount the reconcilers name bound to its ClusterRoles (the -secrets ones to the Secrets role too);
    the operator's namespaced role may read exactly those ServiceAccounts."""
    docs = documents("namespace-enable/enable.yaml")
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert accounts == {
        EXPORT_SERVICE_ACCOUNT,
        EXPORT_SECRETS_SERVICE_ACCOUNT,
        RESTORE_SERVICE_ACCOUNT,
        RESTORE_SECRETS_SERVICE_ACCOUNT,
    }
    bound: dict[str, set[str]] = {}
    for d in docs:
        if d["kind"] == "RoleBinding":
            for subject in d["subjects"]:
                bound.setdefault(subject["name"], set()).add(d["roleRef"]["name"])
    assert bound == {
        "runbook-operator": {"runbook-operator-namespace"},
        EXPORT_SERVICE_ACCOUNT: {"runbook-operator-export"},
        EXPORT_SECRETS_SERVICE_ACCOUNT: {"runbook-operator-export", "runbook-operator-export-secrets"},
        RESTORE_SERVICE_ACCOUNT: {"runbook-operator-restore-kubernetes"},
        RESTORE_SECRETS_SERVICE_ACCOUNT: {
            "runbook-operator-restore-kubernetes",
            "runbook-operator-restore-kubernetes-secrets",
        },
    }
    readable = [r for r in cluster_role()["rules"] if r["resources"] == ["serviceaccounts"]]
    assert readable == [
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"], "resourceNames": sorted(accounts)}
    ]


def test_operator_deployment_has_readiness_and_liveness_probes_and_limits() -> None:
    deployment = next(d for d in documents("deployment.yaml") if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["port"] == "health"
    assert container["livenessProbe"]["httpGet"]["port"] == "health"
    assert {"cpu", "memory", "ephemeral-storage"} <= set(container["resources"]["limits"])
    assert {"cpu", "memory", "ephemeral-storage"} <= set(container["resources"]["requests"])


def test_leader_election_lease_only_in_the_operators_namespace_and_by_name() -> None:
    """The one Role: create Leases (a create names no object), get/patch only the operator's own, in its
    namespace; bound to the operator there. Two replicas, named holders, a budget of one eviction at a time."""
    docs = documents("rbac.yaml")
    [role] = [d for d in docs if d["kind"] == "Role"]
    [binding] = [d for d in docs if d["kind"] == "RoleBinding"]
    assert role["metadata"] == {"name": "runbook-operator-leader", "namespace": "runbook-system"}
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["runbook-operator"],
            "verbs": ["get", "patch"],
        },
    ]
    assert binding["roleRef"]["name"] == "runbook-operator-leader"
    assert binding["metadata"]["namespace"] == "runbook-system"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "runbook-operator", "namespace": "runbook-system"}
    ]

    deployment = next(d for d in documents("deployment.yaml") if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RUNBOOK_LEADER_ELECTION"]["value"] == "true"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    [budget] = documents("poddisruptionbudget.yaml")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]


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
