"""The control plane the integration tier runs on is real, and its launcher fails clearly.

Controllers (garbage collection, Deployments), the scheduler with kwok's fake nodes, and RBAC with real
service-account tokens are exercised through the API like the operator will use them.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

import localcluster

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
WaitFor = Callable[..., Any]
LAUNCHER = REPO_ROOT / "tools" / "localcluster" / "localcluster.py"
RBAC_MANIFEST = REPO_ROOT / "deploy" / "base" / "rbac.yaml"


# ------------------------------------------------------------------------------------ the cluster


def test_garbage_collector_deletes_dependents(
    api: kubernetes.client.ApiClient, namespace: str, wait_for: WaitFor
) -> None:
    core = kubernetes.client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": "dependent",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
                ],
            }
        },
    )
    core.delete_namespaced_config_map("owner", namespace)

    def dependent_gone() -> bool:
        return not any(cm.metadata.name == "dependent" for cm in core.list_namespaced_config_map(namespace).items)

    wait_for(dependent_gone, timeout=60, what="the garbage collector to delete the dependent ConfigMap")


def _deployment(name: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                # Never pulled: kwok only pretends the containers run.
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
            },
        },
    }


def _rolled_out(apps: kubernetes.client.AppsV1Api, name: str, namespace: str, replicas: int) -> bool:
    """What `kubectl rollout status` checks: the newest generation fully updated, available, no old pods."""
    deployment = apps.read_namespaced_deployment(name, namespace)
    status = deployment.status
    return (
        (status.observed_generation or 0) >= deployment.metadata.generation
        and (status.updated_replicas or 0) == replicas
        and (status.replicas or 0) == replicas
        and (status.available_replicas or 0) == replicas
    )


def _ready_pods(core: kubernetes.client.CoreV1Api, name: str, namespace: str) -> list[Any]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={name}").items
    return [
        pod
        for pod in pods
        if pod.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
    ]


@pytest.fixture
def web(
    api: kubernetes.client.ApiClient,
    namespace: str,
    wait_for: WaitFor,
    local_cluster: localcluster.LocalCluster | None,
) -> Iterator[str]:
    """A Deployment of 3 replicas that has become Available on kwok's fake nodes."""
    if local_cluster is None:
        pytest.skip("its image is never pulled: the pods only run on the local control plane's fake nodes")
    apps = kubernetes.client.AppsV1Api(api)
    apps.create_namespaced_deployment(namespace, _deployment("web", 3))
    wait_for(lambda: _rolled_out(apps, "web", namespace, 3), what="Deployment web to become Available")
    yield "web"


def test_deployment_runs_ready_pods_on_fake_nodes(api: kubernetes.client.ApiClient, namespace: str, web: str) -> None:
    core = kubernetes.client.CoreV1Api(api)
    apps = kubernetes.client.AppsV1Api(api)
    conditions = apps.read_namespaced_deployment(web, namespace).status.conditions
    assert any(c.type == "Available" and c.status == "True" for c in conditions)
    pods = _ready_pods(core, web, namespace)
    assert len(pods) == 3
    assert all(pod.status.phase == "Running" and pod.spec.node_name for pod in pods)
    nodes = {node.metadata.name: node for node in core.list_node().items}
    assert all(nodes[pod.spec.node_name].metadata.annotations.get("kwok.x-k8s.io/node") == "fake" for pod in pods)


def test_rollout_restart_completes(
    api: kubernetes.client.ApiClient, namespace: str, web: str, wait_for: WaitFor
) -> None:
    core = kubernetes.client.CoreV1Api(api)
    apps = kubernetes.client.AppsV1Api(api)
    before = {pod.metadata.name for pod in _ready_pods(core, web, namespace)}
    restarted_at = datetime.datetime.now(datetime.UTC).isoformat()
    # Exactly what `kubectl rollout restart` sends.
    apps.patch_namespaced_deployment(
        web,
        namespace,
        {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": restarted_at}}}}},
    )
    wait_for(lambda: _rolled_out(apps, web, namespace, 3), what="the restart to roll out")

    def only_new_pods() -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector=f"app={web}").items
        names = {pod.metadata.name for pod in pods}
        return len(names) == 3 and not names & before

    wait_for(only_new_pods, what="the old pods to be replaced")
    assert len(_ready_pods(core, web, namespace)) == 3


def test_scale_to_zero_and_back(api: kubernetes.client.ApiClient, namespace: str, web: str, wait_for: WaitFor) -> None:
    core = kubernetes.client.CoreV1Api(api)
    apps = kubernetes.client.AppsV1Api(api)
    apps.patch_namespaced_deployment_scale(web, namespace, {"spec": {"replicas": 0}})
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, label_selector=f"app={web}").items,
        what="all pods to be gone after scaling to 0",
    )
    wait_for(lambda: _rolled_out(apps, web, namespace, 0), what="the Deployment to report 0 replicas")
    apps.patch_namespaced_deployment_scale(web, namespace, {"spec": {"replicas": 3}})
    wait_for(lambda: _rolled_out(apps, web, namespace, 3), what="3 replicas available again")
    assert len(_ready_pods(core, web, namespace)) == 3


def _operator_cluster_role() -> dict[str, Any]:
    assert RBAC_MANIFEST.is_file(), f"{RBAC_MANIFEST} is missing"
    for doc in yaml.safe_load_all(RBAC_MANIFEST.read_text()):
        if doc and doc.get("kind") == "ClusterRole" and doc["metadata"]["name"] == "runbook-operator":
            return dict(doc)
    pytest.fail(f"{RBAC_MANIFEST} has no ClusterRole named runbook-operator")


def test_rbac_is_enforced_for_the_operator_service_account(
    api: kubernetes.client.ApiClient, namespace: str, wait_for: WaitFor
) -> None:
    """A real token of a ServiceAccount bound to the operator's ClusterRole: allowed what it grants only."""
    role = _operator_cluster_role()
    role["metadata"] = {"name": f"runbook-operator-{namespace}"}  # cluster-scoped: one per test
    core = kubernetes.client.CoreV1Api(api)
    rbac = kubernetes.client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "operator"}})
    rbac.create_cluster_role(role)
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": role["metadata"]["name"]},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role["metadata"]["name"],
            },
            "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": namespace}],
        }
    )
    victim = f"rb-victim-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": victim}})
    try:
        token = core.create_namespaced_service_account_token(
            "operator", namespace, {"spec": {"expirationSeconds": 600}}
        ).status.token
        configuration = kubernetes.client.Configuration()
        configuration.host = api.configuration.host
        configuration.ssl_ca_cert = api.configuration.ssl_ca_cert
        configuration.verify_ssl = api.configuration.verify_ssl
        configuration.api_key = {"authorization": f"Bearer {token}"}
        with kubernetes.client.ApiClient(configuration) as as_operator:
            operator_core = kubernetes.client.CoreV1Api(as_operator)
            operator_custom = kubernetes.client.CustomObjectsApi(as_operator)

            def granted() -> bool:
                """The role grants listing namespaces and getting its own kinds (absent: 404, not 403)."""
                try:
                    operator_core.list_namespace()
                    operator_custom.get_namespaced_custom_object(
                        "runbook.dev", "v1alpha1", namespace, "backuppolicies", "absent"
                    )
                except kubernetes.client.ApiException as error:
                    if error.status == 403:
                        return False  # the new binding has not reached the authorizer's cache yet
                    assert error.status == 404
                return True

            wait_for(granted, what="the ClusterRole's grants to apply to the operator's service account")
            with pytest.raises(kubernetes.client.ApiException) as denied:
                operator_core.delete_namespace(victim)
            assert denied.value.status == 403
            assert core.read_namespace(victim).status.phase == "Active"
    finally:
        core.delete_namespace(victim)
        rbac.delete_cluster_role_binding(role["metadata"]["name"])
        rbac.delete_cluster_role(role["metadata"]["name"])


# ------------------------------------------------------------------------------------ the launcher


def _run_launcher(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_build_without_go_says_what_to_install(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": "/usr/bin:/bin",
        "GO": str(tmp_path / "no-such-go"),
        "RUNBOOK_CACHE_DIR": str(tmp_path / "cache"),  # nothing cached: a build is needed
    }
    result = _run_launcher("build", env=env)
    assert result.returncode == 2
    assert "Go >= 1.26" in result.stderr
    assert "https://go.dev/dl" in result.stderr


def test_build_with_old_go_says_what_to_install(tmp_path: Path) -> None:
    old_go = tmp_path / "go"
    old_go.write_text("#!/bin/sh\necho go version go1.21.13 linux/amd64\n")
    old_go.chmod(0o755)
    env = {**os.environ, "GO": str(old_go), "RUNBOOK_CACHE_DIR": str(tmp_path / "cache")}
    result = _run_launcher("build", env=env)
    assert result.returncode == 2
    assert f"{old_go} is go1.21, too old" in result.stderr
    assert "https://go.dev/dl" in result.stderr


def test_stale_state_dir_is_cleaned(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "etcd-data").mkdir()
    (state / "kubeconfig").write_text("stale")
    # A leftover "component": its command line names the state dir, as every real component's does.
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", f"--data-dir={state}/etcd-data"],
        start_new_session=True,
    )
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        (state / "pids.json").write_text(json.dumps({"etcd": leftover.pid, "kwok": unrelated.pid}))
        localcluster.LocalCluster(state).clean_stale()
        leftover.wait(timeout=10)
        assert not Path(f"/proc/{leftover.pid}").exists(), "the leftover process is still there"
        assert unrelated.poll() is None, "a process not started for this state dir was killed"
        assert list(state.iterdir()) == []
    finally:
        for process in (leftover, unrelated):
            process.kill()
            process.wait()


def test_components_that_do_not_become_ready_raise_with_their_log(tmp_path: Path) -> None:
    cluster = localcluster.LocalCluster(tmp_path / "state", ready_timeout=0)
    with pytest.raises(localcluster.LocalClusterError, match=r"etcd not ready after 0s; last lines of .*etcd\.log"):
        cluster.start()
    assert not cluster.pid_file.exists()


def test_taken_port_is_retried_and_stop_leaves_no_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([int(taken.getsockname()[1])])

        def picker() -> int:
            return next(picks, None) or localcluster.free_port()

        cluster = localcluster.LocalCluster(tmp_path / "state", port_picker=picker)
        with cluster:
            pids = json.loads(cluster.pid_file.read_text())
            assert cluster.is_ready()
        assert "address already in use); retrying with other ports" in capsys.readouterr().err
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived stop()"
