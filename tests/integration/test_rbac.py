"""The shipped RBAC against the real API server: every rule names real resources, and what the operator's
own ServiceAccount token may do (`kubectl auth can-i`) in an enabled and in a not-enabled namespace."""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import kubernetes
import pytest
import yaml
from tests.helpers import ROOT

import localcluster

pytestmark = pytest.mark.integration

OPTIONAL_GROUPS = {"autoscaling.k8s.io"}  # the VerticalPodAutoscaler CRD, used only when it is installed


def served(api: kubernetes.client.ApiClient) -> set[tuple[str, str]]:
    """Every (group, resource) the API server serves, subresources included (``pods/log``)."""
    pairs = {("", r.name) for r in kubernetes.client.CoreV1Api(api).get_api_resources().resources}
    for group in kubernetes.client.ApisApi(api).get_api_versions().groups:
        version = group.preferred_version.group_version
        listed = api.call_api(
            f"/apis/{version}",
            "GET",
            auth_settings=["BearerToken"],
            response_types_map={200: "object"},
            _return_http_data_only=True,
        )
        pairs |= {(group.name, r["name"]) for r in listed["resources"]}
    return pairs


def test_every_rule_of_the_shipped_roles_names_resources_that_exist(
    api: kubernetes.client.ApiClient, crds_installed: list[str]
) -> None:
    rules = [
        rule
        for name in ("rbac.yaml", "agent-rbac.yaml")
        for d in yaml.safe_load_all((ROOT / "deploy/base" / name).read_text())
        if d["kind"] in ("ClusterRole", "Role")  # the Role: the leader election's Lease
        for rule in d["rules"]
    ]
    known = served(api)
    meaningless = [
        (group, resource)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        if group not in OPTIONAL_GROUPS and (group, resource) not in known
    ]
    assert meaningless == []


# --- what the operator's own token may do --------------------------------------------------------------

FORBIDDEN_EVERYWHERE = [
    ("list", "secrets", None),
    ("watch", "secrets", None),
    ("create", "pods", "exec"),
    ("get", "pods", "exec"),
    ("create", "pods", "attach"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", None),
    ("escalate", "roles.rbac.authorization.k8s.io", None),
    ("bind", "clusterroles.rbac.authorization.k8s.io", None),
    ("bind", "roles.rbac.authorization.k8s.io", None),
    ("impersonate", "serviceaccounts", None),
    ("impersonate", "users", None),
    ("impersonate", "groups", None),
    ("create", "serviceaccounts", "token"),
    ("create", "rolebindings.rbac.authorization.k8s.io", None),
    ("update", "secrets", None),
    ("update", "deployments.apps", None),
    ("patch", "configmaps", None),  # saved policies are in status: ConfigMaps are only read
]
# Writes of Secrets and of workloads: allowed only where an administrator enabled the namespace.
WRITES = [
    ("create", "secrets", None),
    ("patch", "secrets", None),
    ("delete", "secrets", None),
    ("get", "secrets", None),
    ("patch", "deployments.apps", None),
    ("patch", "statefulsets.apps", None),
    ("patch", "deployments.apps", "scale"),
    ("patch", "statefulsets.apps", "scale"),
    ("patch", "cronjobs.batch", None),
    ("create", "jobs.batch", None),
    ("create", "deployments.apps", None),
    ("create", "persistentvolumeclaims", None),
    ("create", "networkpolicies.networking.k8s.io", None),
    ("get", "configmaps", None),
]


def can_i(kubeconfig: Path, verb: str, resource: str, subresource: str | None, namespace: str | None) -> bool:
    """``kubectl auth can-i`` as the kubeconfig's user (a SelfSubjectAccessReview: the operator's own token)."""
    args = [str(localcluster.bin_dir() / "kubectl"), "--kubeconfig", str(kubeconfig), "auth", "can-i", verb, resource]
    args += [f"--subresource={subresource}"] if subresource else []
    args += ["--namespace", namespace] if namespace else ["--all-namespaces"]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stdout + result.stderr
    return result.stdout.strip() == "yes"


def can_i_list(kubeconfig: Path, namespace: str) -> list[tuple[str, str, list[str]]]:
    """``kubectl auth can-i --list`` in the namespace, printed, as (resource, resource names, verbs) rows."""
    args = [str(localcluster.bin_dir() / "kubectl"), "--kubeconfig", str(kubeconfig), "auth", "can-i", "--list"]
    result = subprocess.run([*args, "--namespace", namespace], capture_output=True, text=True, check=True)
    print(f"kubectl auth can-i --list --namespace {namespace} (the operator's ServiceAccount):\n{result.stdout}")
    rows = []
    for line in result.stdout.splitlines()[1:]:
        match = re.match(r"^(\S*)\s+(\[[^\]]*\])\s+(\[[^\]]*\])\s+(\[[^\]]*\])\s*$", line)
        assert match, line
        resource, _, names, verbs = match.groups()
        rows.append((resource, names, verbs.strip("[]").split()))
    return rows


def test_the_operator_cannot_list_secrets_nor_write_outside_enabled_namespaces(
    api: kubernetes.client.ApiClient, operator_kubeconfig: Path, namespace: str
) -> None:
    """The operator's real token (deploy/base/rbac.yaml, the `namespace` fixture's enabling bundle): no Secret
    listing anywhere, no exec/escalate/bind/impersonate, no Secret or workload writes in a namespace nobody
    enabled; in the enabled one exactly what the code needs."""
    core = kubernetes.client.CoreV1Api(api)
    other = f"rb-not-enabled-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": other, "labels": {"runbook.dev/test": "true"}}})
    try:
        for where in (namespace, other):
            rows = can_i_list(operator_kubeconfig, where)
            for resource, _, verbs in rows:
                assert "*" not in verbs and "update" not in verbs, (resource, verbs)
                assert not (resource == "secrets" and {"list", "watch"} & set(verbs)), (resource, verbs)
                assert not {"escalate", "bind", "impersonate"} & set(verbs), (resource, verbs)
                assert resource not in ("pods/exec", "pods/attach"), resource
        for verb, resource, sub in FORBIDDEN_EVERYWHERE:
            for where in (namespace, other, None):
                assert not can_i(operator_kubeconfig, verb, resource, sub, where), (verb, resource, sub, where)
        for verb, resource, sub in WRITES:
            assert not can_i(operator_kubeconfig, verb, resource, sub, other), (verb, resource, sub, other)
            assert not can_i(operator_kubeconfig, verb, resource, sub, None), (verb, resource, sub, "all")
            assert can_i(operator_kubeconfig, verb, resource, sub, namespace), (verb, resource, sub, namespace)
        # The fixed name: its own NetworkPolicy only (a create names no object, so create stays by verb).
        resource = "networkpolicies.networking.k8s.io"
        assert can_i(operator_kubeconfig, "patch", f"{resource}/emergency-isolate", None, namespace)
        assert not can_i(operator_kubeconfig, "patch", f"{resource}/other-policy", None, namespace)
        # What stays cluster-wide: its own kinds and Events, also where nothing is enabled.
        assert can_i(operator_kubeconfig, "patch", "backuppolicies.runbook.dev", "status", other)
        assert can_i(operator_kubeconfig, "create", "events", None, other)
        assert not can_i(operator_kubeconfig, "create", "backuprestores.runbook.dev", None, other)
    finally:
        core.delete_namespace(other)
