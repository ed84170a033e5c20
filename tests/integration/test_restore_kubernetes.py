"""BackupRestore of a Kubernetes export against the real API server: the export made by the BackupPolicy agent
(as its CronJob pod runs it), the restore driven by the operator, the restore Job's pod run as a process with
the token of the enabling bundle's ServiceAccount it names (so the shipped ClusterRoles of
deploy/base/agent-rbac.yaml, bound by the administrator's RoleBindings, are what it may do), its exit reported
as the kubelet would."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import pytest
import yaml
from tests.backup_support import agent_env, manifest_of, new_bucket, policy_spec, run_agent
from tests.helpers import token_kubeconfig
from tests.integration.test_restore import Cluster
from tests.restore_support import SIGNED, private_key
from tests.services import GpgKeyring, S3Server

from runbook_operator.agent.backup import clean_object
from runbook_operator.builders.restore import job_name
from runbook_operator.builders.restore_kubernetes import RESTORE_SECRETS_SERVICE_ACCOUNT, RESTORE_SERVICE_ACCOUNT

pytestmark = pytest.mark.integration

GROUP, VERSION = "runbook.dev", "v1alpha1"
POLICY = "configs"
PRIVATE_KEY_SECRET = "restore-gpg-private"
SECRET_VALUE = "s3cr3t-value-never-in-status"
RESOURCES = ["deployments", "services", "configmaps", "networkpolicies", "horizontalpodautoscalers"]
KINDS = ("Deployment", "Service", "ConfigMap", "Secret", "NetworkPolicy", "HorizontalPodAutoscaler")


def source_objects() -> list[dict[str, Any]]:
    """One of each: the runbook's api Deployment, Service, HPA, its config, its credentials, a policy."""
    labels = {"app": "api"}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "api", "labels": labels},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {
                                "name": "api",
                                "image": "registry.example/api:1.4",
                                "envFrom": [{"configMapRef": {"name": "api-config"}}],
                                "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
                            }
                        ]
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "api", "labels": labels},
            "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "api-config"}, "data": {"LOG_LEVEL": "info"}},
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "api-credentials"},
            "type": "Opaque",
            "stringData": {"password": SECRET_VALUE},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "api-ingress"},
            "spec": {
                "podSelector": {"matchLabels": labels},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "nginx-proxy"}}}]}],
            },
        },
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
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
    ]


PATHS = {
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Service": "/api/v1/namespaces/{ns}/services",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
    "HorizontalPodAutoscaler": "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers",
}


class Objects:
    """Raw reads and writes of the test's kinds in any namespace."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.api = api

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self.api.call_api(
            path,
            method,
            body=body,
            response_types_map={200: "object", 201: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
        )

    def create(self, namespace: str, obj: dict[str, Any]) -> None:
        self.call("POST", PATHS[obj["kind"]].format(ns=namespace), obj)

    def get(self, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.call("GET", f"{PATHS[kind].format(ns=namespace)}/{name}")
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def names(self, namespace: str) -> set[str]:
        found = set()
        for kind, path in PATHS.items():
            for item in self.call("GET", path.format(ns=namespace))["items"]:
                if clean_object({"kind": kind, **item}) is not None:
                    found.add(f"{kind}/{item['metadata']['name']}")
        return found

    def versions(self, namespace: str) -> dict[str, Any]:
        """Each object's resourceVersion, and the restore's own writes (managedFields of runbook-restore); an
        HPA's resourceVersion is left out: the HPA controller writes its status on its own."""
        return {
            f"{kind}/{item['metadata']['name']}": (
                None if kind == "HorizontalPodAutoscaler" else item["metadata"]["resourceVersion"],
                [
                    (entry.get("operation"), entry.get("time"))
                    for entry in item["metadata"].get("managedFields") or []
                    if entry.get("manager") == "runbook-restore"
                ],
            )
            for kind, path in PATHS.items()
            for item in self.call("GET", path.format(ns=namespace))["items"]
        }


@pytest.fixture
def objects(api: kubernetes.client.ApiClient) -> Objects:
    return Objects(api)


@pytest.fixture
def cluster(
    api: kubernetes.client.ApiClient, namespace: str, crds_installed: list[str], wait_for: Callable[..., Any]
) -> Iterator[Cluster]:
    made = Cluster(api, namespace, wait_for)
    made.signing_key()
    with made.verify_pods():
        yield made


@pytest.fixture
def source(api: kubernetes.client.ApiClient, objects: Objects) -> Iterator[str]:
    """The exported namespace, with one object of each kind."""
    core = kubernetes.client.CoreV1Api(api)
    name = f"rb-src-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"runbook.dev/test": "true"}}})
    for obj in source_objects():
        objects.create(name, obj)
    try:
        yield name
    finally:
        core.delete_namespace(name)


def make_export(
    cluster: Cluster,
    source: str,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    kubeconfig: Path,
    *,
    include_secrets: bool = True,
) -> dict[str, Any]:
    """The BackupPolicy (in the test's namespace, exporting ``source``), its Secrets, and one export made by
    its agent; returns the manifest."""
    bucket = new_bucket(s3_server)
    # Exporting another namespace is a cluster administrator's grant (README "Security model"); the agent
    # runs here with the admin's kubeconfig, so no RoleBinding in ``source`` is needed.
    namespace_uid = cluster.core.read_namespace(cluster.namespace).metadata.uid
    cluster.custom.create_cluster_custom_object(
        "runbook.dev",
        "v1alpha1",
        "runbookgrants",
        {
            "apiVersion": "runbook.dev/v1alpha1",
            "kind": "RunbookGrant",
            "metadata": {
                "name": f"{cluster.namespace}-export",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Namespace", "name": cluster.namespace, "uid": namespace_uid}
                ],
            },
            "spec": {"namespaces": [cluster.namespace], "exportNamespaces": [source]},
        },
    )
    kubernetes_source = {"namespaces": [source], "resources": RESOURCES, "includeSecrets": include_secrets}
    spec = policy_spec({"kubernetes": kubernetes_source}, s3_server, bucket)
    result = run_agent(
        agent_env(spec, s3_server, gpg_keyring, KUBECONFIG=str(kubeconfig), **SIGNED),
        namespace=cluster.namespace,
        policy=POLICY,
    )
    assert result.returncode == 0, result.stderr
    cluster.secret(
        "backup-s3-credentials",
        {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
    )
    cluster.core.create_namespaced_config_map(
        cluster.namespace,
        {"metadata": {"name": "backup-gpg-recipients"}, "data": {"team.asc": gpg_keyring.public_key}},
    )
    cluster.secret(PRIVATE_KEY_SECRET, {"private.asc": private_key(gpg_keyring)})
    cluster.create("backuppolicies", POLICY, spec)
    return manifest_of(s3_server, bucket)


def restore_spec(**kubernetes_choice: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "policyRef": POLICY,
        "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
    }
    dry_run = kubernetes_choice.pop("dryRun", False)
    if dry_run:
        spec["dryRun"] = True
    if kubernetes_choice:
        spec["kubernetes"] = kubernetes_choice
    return spec


def run_restore(cluster: Cluster, name: str, kubeconfig: Path, tmp_path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Create the BackupRestore, run its Job's pod with the token of the ServiceAccount it names (the enabling
    bundle's, -secrets with includeSecrets), wait for the end."""
    cluster.create("backuprestores", name, spec)
    job = job_name(name)
    cluster.wait_for(lambda: (cluster.restore(name).get("status") or {}).get("jobName"), what=f"the Job of {name}")
    pod = cluster.batch.read_namespaced_job(job, cluster.namespace).spec.template.spec
    secrets = (spec.get("kubernetes") or {}).get("includeSecrets")
    account = RESTORE_SECRETS_SERVICE_ACCOUNT if secrets else RESTORE_SERVICE_ACCOUNT
    assert pod.service_account_name == account and pod.automount_service_account_token is True
    token = cluster.core.create_namespaced_service_account_token(
        account, cluster.namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    config = token_kubeconfig(kubeconfig, token, tmp_path / f"{name}-kubeconfig")
    result = cluster.run_job_pod(job, KUBECONFIG=str(config))
    assert result.returncode == 0, result.stderr
    return cluster.wait_phase(name, "Succeeded", "Failed", "DryRunSucceeded")


def comparable(obj: dict[str, Any]) -> dict[str, Any]:
    """An object without its namespace-bound fields (what the export strips), the rest as it is."""
    cleaned = clean_object(dict(obj))
    assert cleaned is not None
    cleaned["metadata"].pop("annotations", None)
    return cleaned


def kubectl_diff(kubeconfig: Path, namespace: str, manifests: list[dict[str, Any]], path: Path) -> str:
    path.write_text(yaml.safe_dump_all(manifests))
    diff = subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            str(kubeconfig),
            "diff",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            "runbook-restore",
            "-n",
            namespace,
            "-f",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert diff.returncode in (0, 1), diff.stderr
    return diff.stdout


def test_export_round_trip_into_a_fresh_namespace_and_dry_runs_change_nothing(
    cluster: Cluster,
    source: str,
    objects: Objects,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    kubeconfig: Path,
    operator_runner: kopf.testing.KopfRunner,
    tmp_path: Path,
) -> None:
    manifest = make_export(cluster, source, s3_server, gpg_keyring, kubeconfig)
    fresh = cluster.namespace
    expected = {f"{o['kind']}/{o['metadata']['name']}" for o in source_objects()}
    before = objects.versions(fresh)
    assert not expected & objects.names(fresh)

    # A dry run: the API server's own, summarised; nothing is created.
    dry = run_restore(
        cluster, "preview", kubeconfig, tmp_path, restore_spec(namespace=source, includeSecrets=True, dryRun=True)
    )
    assert dry["status"]["phase"] == "DryRunSucceeded", dry["status"]
    summary = dry["status"]["kubernetes"]
    assert summary["dryRun"] is True and summary["section"] == source and summary["namespace"] == fresh
    assert set(summary["created"]) == expected and summary["counts"]["created"] == len(expected)
    assert not summary["replaced"] and not summary["skipped"] and not summary["failed"]
    assert not expected & objects.names(fresh)
    assert objects.versions(fresh) == before
    assert dry["status"]["checks"]["sha256"] == manifest["data"]["sha256"]

    # The restore.
    done = run_restore(cluster, "rebuild", kubeconfig, tmp_path, restore_spec(namespace=source, includeSecrets=True))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert set(done["status"]["kubernetes"]["created"]) == expected
    ready = cluster.condition(done, "Ready")
    assert ready["status"] == "True" and ready["reason"] == "Restored"
    assert expected <= objects.names(fresh)

    # The originals against the restored objects: equal except namespace-bound fields.
    originals = []
    for obj in source_objects():
        original = objects.get(source, obj["kind"], obj["metadata"]["name"])
        restored = objects.get(fresh, obj["kind"], obj["metadata"]["name"])
        assert original is not None and restored is not None
        # Namespace-bound: the namespace, uid, resourceVersion and times, managedFields, a Service's cluster IPs.
        for part in ("spec", "data", "type"):
            assert comparable(original).get(part) == comparable(restored).get(part), (obj["kind"], part)
        assert comparable(original) == comparable(restored)
        originals.append(comparable(original))
    assert kubectl_diff(kubeconfig, fresh, originals, tmp_path / "originals.yaml") == ""

    # A dry run after the restore: everything unchanged, nothing written.
    after = objects.versions(fresh)
    again = run_restore(
        cluster, "recheck", kubeconfig, tmp_path, restore_spec(namespace=source, includeSecrets=True, dryRun=True)
    )
    assert again["status"]["phase"] == "DryRunSucceeded", again["status"]
    assert set(again["status"]["kubernetes"]["unchanged"]) == expected
    assert objects.versions(fresh) == after

    # No Secret value in status or Events; names only.
    texts = [json.dumps(cluster.restore(n)) for n in ("preview", "rebuild", "recheck")]
    texts += [f"{e.reason} {e.message}" for n in ("preview", "rebuild", "recheck") for e in cluster.events(n)]
    assert all(SECRET_VALUE not in text for text in texts)
    # The Job's write access is gone once it ended.
    bindings = kubernetes.client.RbacAuthorizationV1Api(cluster.api).list_namespaced_role_binding(fresh)
    assert not [b.metadata.name for b in bindings.items if b.metadata.name.startswith("restore-")]


def test_objects_that_differ_are_skipped_or_replaced_as_conflicts_says(
    cluster: Cluster,
    source: str,
    objects: Objects,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    kubeconfig: Path,
    operator_runner: kopf.testing.KopfRunner,
    tmp_path: Path,
) -> None:
    make_export(cluster, source, s3_server, gpg_keyring, kubeconfig, include_secrets=False)
    fresh = cluster.namespace
    objects.create(
        fresh,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "api-config"}, "data": {"LOG_LEVEL": "debug"}},
    )
    local = objects.versions(fresh)["ConfigMap/api-config"]

    skip = run_restore(cluster, "keep-local", kubeconfig, tmp_path, restore_spec(namespace=source))
    assert skip["status"]["phase"] == "Succeeded", skip["status"]
    summary = skip["status"]["kubernetes"]
    assert summary["skipped"] == ["ConfigMap/api-config"] and summary["conflicts"] == "Skip"
    assert "ConfigMap/api-config" not in summary["created"] + summary["replaced"]
    changed = objects.get(fresh, "ConfigMap", "api-config")
    assert changed is not None and changed["data"] == {"LOG_LEVEL": "debug"}
    assert changed["metadata"]["resourceVersion"] == local[0]

    preview = run_restore(
        cluster,
        "replace-preview",
        kubeconfig,
        tmp_path,
        restore_spec(namespace=source, conflicts="Replace", dryRun=True),
    )
    assert preview["status"]["kubernetes"]["replaced"] == ["ConfigMap/api-config"]
    assert objects.versions(fresh)["ConfigMap/api-config"] == local

    replace = run_restore(
        cluster, "take-backup", kubeconfig, tmp_path, restore_spec(namespace=source, conflicts="Replace")
    )
    assert replace["status"]["phase"] == "Succeeded", replace["status"]
    assert replace["status"]["kubernetes"]["replaced"] == ["ConfigMap/api-config"]
    replaced = objects.get(fresh, "ConfigMap", "api-config")
    assert replaced is not None and replaced["data"] == {"LOG_LEVEL": "info"}


def test_bad_inputs_stop_in_preflight_and_change_nothing(
    cluster: Cluster,
    source: str,
    objects: Objects,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    kubeconfig: Path,
    operator_runner: kopf.testing.KopfRunner,
) -> None:
    make_export(cluster, source, s3_server, gpg_keyring, kubeconfig, include_secrets=False)
    before = objects.versions(cluster.namespace)
    cases = {
        # a namespace no grant lists is refused before the backup is read
        "not-granted": (restore_spec(namespace="not-exported"), "NotPermitted", "spec.kubernetes.namespace"),
        "own-section": (restore_spec(), "SectionNotFound", cluster.namespace),
        "pg-target": (
            {**restore_spec(namespace=source), "target": {"database": "scratch"}},
            "TargetMismatch",
            "spec.target",
        ),
        "elsewhere": (
            restore_spec(namespace=source, targetNamespace=source),
            "NotPermitted",
            "spec.kubernetes.targetNamespace",
        ),
        "no-secrets": (restore_spec(namespace=source, includeSecrets=True), "SecretsNotInBackup", "includeSecrets"),
    }
    for name, (spec, _, _) in cases.items():
        cluster.create("backuprestores", name, spec)
    for name, (_, reason, field) in cases.items():
        done = cluster.wait_phase(name, "Failed", "Succeeded", "DryRunSucceeded")
        ready = cluster.condition(done, "Ready")
        assert (done["status"]["phase"], ready["reason"]) == ("Failed", reason), (name, ready)
        assert field in ready["message"], (name, ready["message"])
        assert [(s["name"], s["phase"]) for s in done["status"]["steps"]] == [("Preflight", "Failed")]
        assert not (done["status"] or {}).get("jobName")
    assert objects.versions(cluster.namespace) == before
    assert objects.names(source) == {f"{o['kind']}/{o['metadata']['name']}" for o in source_objects()}
