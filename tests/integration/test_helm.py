"""The Helm chart (deploy/helm/runbook-operator/) against the kustomize install it mirrors.

Kustomize is the source: for the same settings, `helm template` must render the same objects as
`kubectl kustomize`, compared parsed (order and formatting do not matter). The only difference allowed is
the four labels Helm's conventions put on each object's own metadata.labels (HELM_LABELS, with the values
this release must have); nothing else, not even in a pod template or a selector. helm is built from its Go
module by tools/helm/helm.py (cached); a helm that cannot be built fails these tests, never skips them.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from tests.helpers import OperatorProcess, server_side_apply, token_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "runbook-operator"
MONITORING = ROOT / "deploy" / "monitoring"
sys.path.insert(0, str(ROOT / "tools" / "helm"))
sys.path.insert(0, str(ROOT / "tools" / "localcluster"))

import helm as helm_tool  # noqa: E402 - found through the sys.path entry above
import localcluster  # noqa: E402

RELEASE = "runbook-operator"
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
HELM_LABELS = {
    "helm.sh/chart": f"runbook-operator-{CHART_META['version']}",
    "app.kubernetes.io/managed-by": "Helm",
    "app.kubernetes.io/instance": RELEASE,
    "app.kubernetes.io/version": CHART_META["appVersion"],
}
# The cluster-wide mode of deploy/overlays/cluster-wide/, in values.
CLUSTER_WIDE = ["--set", "rbac.scope=cluster"]
ENABLED = "hungryhippaahneties"  # the namespace deploy/ enables (deploy/base/namespace-enable/)
# Kinds whose CRDs (the Prometheus Operator's) the test API server does not have: not dry-run (see below).
NO_CRD_HERE = {"ServiceMonitor", "PrometheusRule", "PodMonitor"}
RBAC = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}

Key = tuple[str, str, str, str]


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_tool.build()


def run(args: list[str | Path], **kwargs: Any) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def helm_template(helm: Path, *values: str) -> list[dict[str, Any]]:
    return documents(run([helm, "template", RELEASE, CHART, "--include-crds", *values]))


def kustomize(directory: Path) -> list[dict[str, Any]]:
    return documents(run([localcluster.bin_dir() / "kubectl", "kustomize", directory]))


def key(doc: dict[str, Any]) -> Key:
    meta = doc["metadata"]
    return (doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"])


def by_key(docs: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    keyed = {key(doc): doc for doc in docs}
    assert len(keyed) == len(docs), "two objects with the same apiVersion, kind, namespace and name"
    return keyed


def without_helm_labels(doc: dict[str, Any]) -> dict[str, Any]:
    """The object as kustomize would have it: Helm's labels (which must all be there) removed. CRDs come
    from the chart's crds/ verbatim, so they carry none."""
    out = copy.deepcopy(doc)
    labels = out["metadata"].get("labels", {})
    if doc["kind"] != "CustomResourceDefinition":
        assert {k: labels.get(k) for k in HELM_LABELS} == HELM_LABELS, f"{key(doc)} lacks Helm's labels"
        for name in HELM_LABELS:
            del labels[name]
    if "labels" in out["metadata"] and not labels:
        del out["metadata"]["labels"]
    return out


def assert_same_objects(rendered: list[dict[str, Any]], kustomized: list[dict[str, Any]]) -> None:
    helm_objects = {k: without_helm_labels(v) for k, v in by_key(rendered).items()}
    kustomize_objects = by_key(kustomized)
    assert sorted(helm_objects) == sorted(kustomize_objects), "the two installs make different objects"
    for name, expected in kustomize_objects.items():
        assert helm_objects[name] == expected, f"{name} differs"


def monitoring_kustomization(tmp_path: Path) -> Path:
    """deploy/ with the deploy/monitoring/ component: the kustomize install with monitoring on."""
    directory = tmp_path / "with-monitoring"
    directory.mkdir()
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # relative: kustomize refuses absolute paths
                "resources": [os.path.relpath(ROOT / "deploy", directory)],
                "components": [os.path.relpath(MONITORING, directory)],
            }
        )
    )
    return directory


# --- the chart is well-formed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [[], CLUSTER_WIDE, ["--set", "monitoring.enabled=true"]],
    ids=["default", "cluster-wide", "monitoring"],
)
def test_helm_lint_passes(helm: Path, values: list[str]) -> None:
    output = run([helm, "lint", "--strict", CHART, *values])
    assert "1 chart(s) linted, 0 chart(s) failed" in output


def test_chart_crds_are_the_generated_crds() -> None:
    """One source: the chart's crds/ are symlinks to crds/ (`make crds` output), one for each CRD there."""
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml") if p.name != "kustomization.yaml")
    in_chart = sorted(p.name for p in (CHART / "crds").iterdir())
    assert in_chart == generated
    for name in in_chart:
        link = CHART / "crds" / name
        assert link.is_symlink(), f"{link} should be a symlink to crds/{name}"
        assert link.resolve() == (ROOT / "crds" / name).resolve()


def test_chart_rbac_files_are_deploys() -> None:
    """The chart's RBAC rules and enabling bundle are read from deploy/'s manifests (which give each rule's
    reason)."""
    assert (CHART / "files" / "rbac.yaml").resolve() == ROOT / "deploy" / "base" / "rbac.yaml"
    assert (CHART / "files" / "agent-rbac.yaml").resolve() == ROOT / "deploy" / "base" / "agent-rbac.yaml"
    enable = ROOT / "deploy" / "base" / "namespace-enable" / "enable.yaml"
    assert (CHART / "files" / "namespace-enable.yaml").resolve() == enable


def test_packaged_chart_is_self_contained(helm: Path, tmp_path: Path) -> None:
    """`helm package` stores the symlinked files' contents: the archive renders what the directory does."""
    run([helm, "package", CHART, "--destination", tmp_path])
    archive = tmp_path / f"runbook-operator-{CHART_META['version']}.tgz"
    values = ["--include-crds", "--set", "monitoring.enabled=true", *CLUSTER_WIDE]
    packaged = documents(run([helm, "template", RELEASE, archive, *values]))
    assert packaged == helm_template(helm, "--set", "monitoring.enabled=true", *CLUSTER_WIDE)


# --- the chart renders what kustomize renders -------------------------------------------------------------


def test_default_values_render_deploy(helm: Path) -> None:
    assert_same_objects(helm_template(helm), kustomize(ROOT / "deploy"))


ENABLING_BINDINGS = {
    ("RoleBinding", name)
    for name in (
        "runbook-operator",
        "runbook-export",
        "runbook-export-secrets",
        "runbook-restore-kubernetes",
        "runbook-restore-kubernetes-secrets",
    )
}


def test_default_values_bind_the_namespaced_role_in_the_enabled_namespace_only(helm: Path) -> None:
    rendered = helm_template(helm)
    bindings = {(d["kind"], d["metadata"]["name"]) for d in rendered if d["kind"].endswith("Binding")}
    leader = ("RoleBinding", "runbook-operator-leader")  # the Lease's Role, in the operator's namespace
    assert bindings == {("ClusterRoleBinding", "runbook-operator"), leader, *ENABLING_BINDINGS}
    namespaces = {
        d["metadata"]["namespace"]
        for d in rendered
        if d["kind"] == "RoleBinding" and d["metadata"]["name"] != leader[1]
    }
    assert namespaces == {ENABLED}


def test_cluster_scope_renders_the_cluster_wide_overlay(helm: Path) -> None:
    rendered = helm_template(helm, *CLUSTER_WIDE)
    assert_same_objects(rendered, kustomize(ROOT / "deploy" / "overlays" / "cluster-wide"))
    bindings = {(d["kind"], d["metadata"]["name"]) for d in rendered if d["kind"].endswith("Binding")}
    assert bindings == {
        ("ClusterRoleBinding", "runbook-operator"),
        ("ClusterRoleBinding", "runbook-operator-namespace"),
        ("RoleBinding", "runbook-operator-leader"),
        *ENABLING_BINDINGS,
    }


def test_monitoring_on_renders_deploy_with_the_monitoring_component(helm: Path, tmp_path: Path) -> None:
    assert MONITORING.is_dir(), f"{MONITORING} (the kustomize component the chart mirrors) is missing"
    rendered = helm_template(helm, "--set", "monitoring.enabled=true")
    assert_same_objects(rendered, kustomize(monitoring_kustomization(tmp_path)))
    assert {d["kind"] for d in rendered} - {d["kind"] for d in helm_template(helm)}, "monitoring adds nothing"


# --- values ----------------------------------------------------------------------------------------------


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_values_reach_the_objects(helm: Path) -> None:
    docs = helm_template(
        helm,
        "--set", "namespace.name=ops",
        "--set", "image.repository=registry.example/runbook",
        "--set", "image.tag=1.2.3",
        "--set", "image.pullPolicy=Always",
        "--set", "resources.limits.memory=1Gi",
        "--set", "ports.metrics=9191",
        "--set", "ports.health=8181",
        "--set", "logFormat=plain",
        "--set", "watchNamespaces={a,b}",
        "--set", "extraEnv[0].name=RUNBOOK_MAX_WORKERS",
        "--set-string", "extraEnv[0].value=5",
        "--set", "monitoring.enabled=true",
        "--set", "replicaCount=3",
    )  # fmt: skip
    container = operator_container(docs)
    namespace_args = ["--namespace", "a", "--namespace", "b"]
    assert container["image"] == "registry.example/runbook:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert container["args"] == ["run", "--log-format", "plain", "--health-port", "8181", *namespace_args]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RUNBOOK_AGENT_IMAGE"] == "registry.example/runbook:1.2.3"
    assert env["RUNBOOK_METRICS_PORT"] == "9191"
    assert env["RUNBOOK_MAX_WORKERS"] == "5"
    assert next(d for d in docs if d["kind"] == "Deployment")["spec"]["replicas"] == 3
    no_budget = helm_template(helm, "--set", "podDisruptionBudget.enabled=false")
    assert "PodDisruptionBudget" not in {d["kind"] for d in no_budget}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 9191, "health": 8181}
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["ports"][0]["port"] == 9191
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    # The operator's own objects go to ops; the enabling bundle to the enabled namespace, naming ops' account.
    namespaced = [d for d in docs if d["kind"] not in cluster_scoped and d["metadata"]["namespace"] != ENABLED]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"ops"}
    enabling = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "runbook-operator")
    assert enabling["subjects"] == [{"kind": "ServiceAccount", "name": "runbook-operator", "namespace": "ops"}]
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "ops"
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["ops"]


def test_namespace_not_created_and_rbac_left_to_the_admin(helm: Path) -> None:
    kinds = {d["kind"] for d in helm_template(helm, "--set", "namespace.create=false", "--set", "rbac.create=false")}
    assert kinds == {"CustomResourceDefinition", "ServiceAccount", "Deployment", "PodDisruptionBudget", "Service"}


def test_every_enabled_namespace_gets_the_enabling_bundle(helm: Path) -> None:
    docs = helm_template(helm, "--set", "rbac.enabledNamespaces={hungryhippaahneties,exported}")
    bindings = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "runbook-operator"]
    assert sorted(d["metadata"]["namespace"] for d in bindings) == ["exported", "hungryhippaahneties"]
    export = next(
        d
        for d in docs
        if d["kind"] == "RoleBinding"
        and (d["metadata"]["name"], d["metadata"]["namespace"]) == ("runbook-export", "exported")
    )
    assert {s["namespace"] for s in export["subjects"]} == {"exported"}
    none_enabled = helm_template(helm, "--set-json", "rbac.enabledNamespaces=[]")
    bindings = [d["metadata"]["name"] for d in none_enabled if d["kind"] == "RoleBinding"]
    assert bindings == ["runbook-operator-leader"]  # the Lease's, in the operator's own namespace only


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "replicas=2"], "additional properties 'replicas' not allowed"),
        (["--set", "rbac.scope=everywhere"], "at '/rbac/scope': value must be one of"),
        (["--set", "image.pullPolicy=Sometimes"], "at '/image/pullPolicy'"),
        (["--set", "ports.metrics=0"], "at '/ports/metrics': minimum"),
        (["--set", "watchNamespaces={Not_A_Name}"], "at '/watchNamespaces/0'"),
        (["--set", "rbac.enabledNamespaces={Not_A_Name}"], "at '/rbac/enabledNamespaces/0'"),
        (["--set", "rbac.scope=namespaced"], "at '/rbac/scope': value must be one of"),
        (["--set", "replicaCount=0"], "at '/replicaCount': minimum"),
    ],
    ids=[
        "replicas",
        "scope",
        "pull-policy",
        "port",
        "namespace-name",
        "enabled-namespace-name",
        "old-scope",
        "replica-count",
    ],
)
def test_bad_values_are_refused(helm: Path, values: list[str], message: str) -> None:
    result = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), *values], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_every_value_has_a_schema_and_a_readme_row() -> None:
    """values.schema.json describes every default in values.yaml, and the README's table lists it."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (ROOT / "README.md").read_text()

    def leaves(node: Any, schema_node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        if "properties" in schema_node and "description" not in schema_node:  # a group of values
            assert set(node) == set(schema_node["properties"]), f"{path or 'values'}: schema and values differ"
            for name, child in node.items():
                yield from leaves(child, schema_node["properties"][name], f"{path}.{name}".lstrip("."))
        else:
            yield path, schema_node

    for path, schema_node in leaves(values, schema, ""):
        assert schema_node.get("description"), f"{path} has no description in values.schema.json"
        assert f"| `{path}` |" in readme, f"README.md's Helm values table has no row for `{path}`"


# --- the API server accepts what the chart renders ------------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    ["namespaces", "cluster"],
)
def test_rendered_manifests_pass_server_side_dry_run(
    helm: Path, api: kubernetes.client.ApiClient, namespace: str, mode: str
) -> None:
    """Every object, in the test's namespace, server-side applied with dryRun=All: the real API server's
    validation (schemas, CEL, RBAC escalation checks) without persisting anything. The Prometheus
    Operator's kinds are left out (NO_CRD_HERE): the test API server has no CRDs for them, and a stand-in
    CRD would check nothing beyond what the kustomize comparison above already does."""
    values = ["--set", f"namespace.name={namespace}", "--set", "monitoring.enabled=true"]
    values += ["--set", f"rbac.scope={mode}", "--set", f"rbac.enabledNamespaces={{{namespace}}}"]
    started = time.monotonic()
    docs = helm_template(helm, *values)
    print(f"helm template ({mode}, {len(docs)} objects): {time.monotonic() - started:.2f}s")
    dynamic = kubernetes.dynamic.DynamicClient(api)
    checked = []
    for doc in docs:
        if doc["kind"] in NO_CRD_HERE:
            continue
        resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        resource.server_side_apply(
            body=doc,
            namespace=doc["metadata"].get("namespace"),
            field_manager="runbook-helm-test",
            force_conflicts=True,
            dry_run="All",
        )
        checked.append(doc["kind"])
    assert {"Namespace", "CustomResourceDefinition", "ClusterRole", "Deployment", "Service"} <= set(checked)


# --- the enabled-namespace RBAC is enough for the operator ------------------------------------------------


def test_operator_works_with_the_enabled_namespace_rbac_only(
    helm: Path,
    api: kubernetes.client.ApiClient,
    kubeconfig: Path,
    crds_installed: list[str],
    namespace: str,
    tmp_path: Path,
    wait_for: Any,
) -> None:
    """The operator as a ServiceAccount holding only what the chart grants (the cluster-wide ClusterRole, the
    namespaced one through the enabling bundle's RoleBinding in the watched namespace) starts and isolates,
    then releases, an empty namespace."""
    core = kubernetes.client.CoreV1Api(api)
    home = f"rb-helm-{uuid.uuid4().hex[:8]}"  # where the operator's ServiceAccount lives
    core.create_namespace({"metadata": {"name": home, "labels": {"runbook.dev/test": "true"}}})
    values = ["--set", f"namespace.name={home}", "--set", "namespace.create=false"]
    rbac = [
        d for d in helm_template(helm, *values, "--set", f"rbac.enabledNamespaces={{{namespace}}}") if d["kind"] in RBAC
    ]
    assert {d["kind"] for d in rbac} == RBAC
    # The ClusterRoles are the session's (conftest applies deploy/base's, which the chart's equal); the chart's
    # ClusterRoleBinding is applied under a name of its own (the session's runbook-operator serves the others).
    binding = next(d for d in rbac if d["kind"] == "ClusterRoleBinding")
    binding["metadata"]["name"] = f"runbook-operator-{home}"
    custom = kubernetes.client.CustomObjectsApi(api)
    operator = None
    try:
        server_side_apply(api, [d for d in rbac if d["kind"] != "ClusterRole"])
        token = core.create_namespaced_service_account_token(
            "runbook-operator", home, {"spec": {"expirationSeconds": 3600}}
        ).status.token
        operator = OperatorProcess(
            token_kubeconfig(kubeconfig, token, tmp_path / "kubeconfig"), namespace, tmp_path / "operator.log"
        )
        operator.start()
        body = {
            "apiVersion": "runbook.dev/v1alpha1",
            "kind": "EmergencyIsolation",
            "metadata": {"name": "breach"},
            "spec": {
                "reason": "enabled-namespace RBAC smoke test",
                "incidentId": "INC-1",
                "severity": "P1",
                "network": {"isolate": True},
                "evidence": {"capture": False},
            },
        }
        args = ("runbook.dev", "v1alpha1", namespace, "emergencyisolations")
        custom.create_namespaced_custom_object(*args, body)

        def phase() -> str:
            return str(custom.get_namespaced_custom_object(*args, "breach").get("status", {}).get("phase"))

        wait_for(lambda: phase() == "Isolated", timeout=90, what=f"the isolation to be Isolated (log: {operator.log})")
        networking = kubernetes.client.NetworkingV1Api(api)
        assert [p.metadata.name for p in networking.list_namespaced_network_policy(namespace).items] == [
            "emergency-isolate"
        ]
        custom.delete_namespaced_custom_object(*args, "breach")
        wait_for(lambda: not custom.list_namespaced_custom_object(*args)["items"], timeout=60, what="the release")
        assert not networking.list_namespaced_network_policy(namespace).items
        assert "Forbidden" not in operator.log.read_text()
    finally:
        if operator is not None:
            operator.stop()
        kubernetes.client.RbacAuthorizationV1Api(api).delete_cluster_role_binding(binding["metadata"]["name"])
        core.delete_namespace(home)
