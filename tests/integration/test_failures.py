"""Failures nobody foresaw reach the user: an operator whose RBAC lacks one permission (the way the shipped
ClusterRole once lacked `create` on CronJobs) turns the API server's refusal into Ready=False with the
reason and message, one Warning Event, and retries with backoff until the permission is there.

Each test runs the operator as its own process (as the Deployment does) under a ServiceAccount bound to
deploy/'s ClusterRole with exactly one (group, resource, verb) taken out.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from tests.backup_support import new_bucket
from tests.helpers import ROOT, OperatorProcess, token_kubeconfig
from tests.integration.conftest import grant
from tests.services import S3Server

pytestmark = pytest.mark.integration

GROUP, VERSION = "runbook.dev", "v1alpha1"
KINDS = {
    "backuppolicies": "BackupPolicy",
    "backuprestores": "BackupRestore",
    "secretrotations": "SecretRotation",
    "emergencyisolations": "EmergencyIsolation",
    "scalingprofiles": "ScalingProfile",
}
# Everything deploy/ grants the operator in an enabled namespace: both ClusterRoles' rules, as one role.
SHIPPED_ROLE = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRole",
    "rules": [
        rule
        for d in yaml.safe_load_all((ROOT / "deploy/base/rbac.yaml").read_text())
        if d["kind"] == "ClusterRole"
        for rule in d["rules"]
    ],
}


def without(role: dict[str, Any], group: str, resource: str, verb: str) -> dict[str, Any]:
    """The role with one permission taken out of every rule that grants it (the rest of each rule kept)."""
    rules = []
    for rule in copy.deepcopy(role["rules"]):
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
            others = [r for r in rule["resources"] if r != resource]
            if others:
                rules.append({**rule, "resources": others})
            verbs = [v for v in rule["verbs"] if v != verb]
            if verbs:
                rules.append({"apiGroups": [group], "resources": [resource], "verbs": verbs})
        else:
            rules.append(rule)
    return {**role, "rules": rules}


class Restricted:
    """A ServiceAccount of the test namespace bound to a ClusterRole of our making, and an operator process
    running under its token."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, kubeconfig: Path, tmp: Path) -> None:
        self.api, self.namespace, self.tmp = api, namespace, tmp
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.role_name = f"runbook-operator-{namespace}"
        self.core.create_namespaced_service_account(namespace, {"metadata": {"name": "operator"}})
        token = self.core.create_namespaced_service_account_token(
            "operator", namespace, {"spec": {"expirationSeconds": 3600}}
        ).status.token
        self.kubeconfig = token_kubeconfig(kubeconfig, token, tmp / "operator.kubeconfig")
        self.operator = OperatorProcess(self.kubeconfig, namespace, tmp / "operator.log")

    def grant(self, role: dict[str, Any]) -> None:
        body = {**copy.deepcopy(role), "metadata": {"name": self.role_name}}
        try:
            current = self.rbac.read_cluster_role(self.role_name)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise
            self.rbac.create_cluster_role(body)
            self.rbac.create_cluster_role_binding(
                {
                    "metadata": {"name": self.role_name},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": self.role_name},
                    "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": self.namespace}],
                }
            )
            return
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        self.rbac.replace_cluster_role(self.role_name, body)

    def start(self) -> None:
        self.operator.start()

    def close(self) -> None:
        self.operator.stop()
        for delete in (self.rbac.delete_cluster_role_binding, self.rbac.delete_cluster_role):
            try:
                delete(self.role_name)
            except kubernetes.client.ApiException as error:
                if error.status != 404:
                    raise

    # --- what the tests look at ------------------------------------------------------------------------

    def create(self, plural: str, name: str, spec: dict[str, Any]) -> None:
        kubernetes.client.CustomObjectsApi(self.api).create_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            plural,
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": KINDS[plural], "metadata": {"name": name}, "spec": spec},
        )

    def ready(self, plural: str, name: str) -> dict[str, Any] | None:
        body = kubernetes.client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, name
        )
        conditions = (body.get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "Ready"), None)

    def events(self, name: str, reason: str) -> list[Any]:
        listed = self.core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={name}")
        return [e for e in listed.items if e.reason == reason]


@pytest.fixture
def restricted(
    api: kubernetes.client.ApiClient, namespace: str, crds_installed: list[str], kubeconfig: Path, tmp_path: Path
) -> Iterator[Restricted]:
    operator = Restricted(api, namespace, kubeconfig, tmp_path)
    try:
        yield operator
    finally:
        operator.close()


def assert_refused(
    operator: Restricted, wait_for: Callable[..., Any], plural: str, name: str, resource: str
) -> dict[str, Any]:
    """Ready=False, reason Forbidden, the API server's message naming the resource, and one Warning Event."""
    ready = wait_for(
        lambda: (r := operator.ready(plural, name)) and r["status"] == "False" and r["reason"] == "Forbidden" and r,
        timeout=60,
        what=f"{plural}/{name} Ready=False (Forbidden)",
    )
    assert resource in ready["message"] and "HTTP 403" in ready["message"], ready
    wait_for(
        lambda: any((e.count or 1) >= 2 for e in operator.events(name, "Forbidden")),
        timeout=60,
        what="a retry counted on the Forbidden Event",
    )
    [event] = operator.events(name, "Forbidden")  # retried, and the repetition counted on one Event
    assert event.type == "Warning"
    return ready


def test_backup_policy_without_cronjob_create_says_so_and_recovers_when_granted(
    restricted: Restricted, s3_server: S3Server, wait_for: Callable[..., Any]
) -> None:
    """The shipped-RBAC defect itself: status said nothing (status: null) and no CronJob ever came."""
    core = kubernetes.client.CoreV1Api(restricted.api)
    ns = restricted.namespace
    core.create_namespaced_secret(ns, {"metadata": {"name": "db"}, "stringData": {"username": "u", "password": "p"}})
    core.create_namespaced_secret(
        ns,
        {
            "metadata": {"name": "s3"},
            "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
        },
    )
    core.create_namespaced_secret(ns, {"metadata": {"name": "gpg"}, "stringData": {"passphrase": "a-passphrase-1"}})
    restricted.grant(without(SHIPPED_ROLE, "batch", "cronjobs", "create"))
    grant(restricted.api, ns, hosts=[("127.0.0.1", 5432)])  # the policy's host (the tenancy rules)
    restricted.start()
    restricted.create(
        "backuppolicies",
        "db",
        {
            "source": {
                "postgresql": {
                    "host": "127.0.0.1",
                    "database": "app",
                    "credentialsSecretRef": {"name": "db"},
                    "insecurePlaintext": True,
                }
            },
            "schedule": "0 */6 * * *",
            "destination": {
                "s3": {
                    "bucket": new_bucket(s3_server),
                    "endpoint": s3_server.endpoint,
                    "credentialsSecretRef": {"name": "s3"},
                    "serverSideEncryption": "None",
                }
            },
            "encryption": {"gpg": {"passphraseSecretRef": {"name": "gpg", "key": "passphrase"}}},
        },
    )
    assert_refused(restricted, wait_for, "backuppolicies", "db", "cronjobs")
    restricted.grant(SHIPPED_ROLE)
    batch = kubernetes.client.BatchV1Api(restricted.api)
    wait_for(lambda: batch.list_namespaced_cron_job(ns).items, timeout=90, what="the CronJob after the grant")
    wait_for(lambda: (r := restricted.ready("backuppolicies", "db")) and r["status"] == "True", timeout=30)


def test_isolation_without_networkpolicy_create_says_so(restricted: Restricted, wait_for: Callable[..., Any]) -> None:
    restricted.grant(without(SHIPPED_ROLE, "networking.k8s.io", "networkpolicies", "create"))
    restricted.start()
    restricted.create(
        "emergencyisolations",
        "breach",
        {
            "reason": "test",
            "incidentId": "INC-1",
            "severity": "P1",
            "scaleToZero": {"enabled": False},
            "evidence": {"capture": False},
        },
    )
    assert_refused(restricted, wait_for, "emergencyisolations", "breach", "networkpolicies")


def test_scaling_profile_without_hpa_create_says_so(restricted: Restricted, wait_for: Callable[..., Any]) -> None:
    labels = {"app": "api"}
    kubernetes.client.AppsV1Api(restricted.api).create_namespaced_deployment(
        restricted.namespace,
        {
            "metadata": {"name": "api"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "api", "image": "registry.invalid/api:1"}]},
                },
            },
        },
    )
    restricted.grant(without(SHIPPED_ROLE, "autoscaling", "horizontalpodautoscalers", "create"))
    restricted.start()
    restricted.create(
        "scalingprofiles",
        "api",
        {"targetRef": {"kind": "Deployment", "name": "api"}, "autoscaling": {"minReplicas": 2, "maxReplicas": 10}},
    )
    assert_refused(restricted, wait_for, "scalingprofiles", "api", "horizontalpodautoscalers")


def test_secret_rotation_without_secret_create_says_so(restricted: Restricted, wait_for: Callable[..., Any]) -> None:
    kubernetes.client.CoreV1Api(restricted.api).create_namespaced_secret(
        restricted.namespace, {"metadata": {"name": "app"}, "stringData": {"TOKEN": f"old-{uuid.uuid4().hex}"}}
    )
    restricted.grant(without(SHIPPED_ROLE, "", "secrets", "create"))
    restricted.start()
    restricted.create("secretrotations", "app", {"secretRef": {"name": "app", "key": "TOKEN"}, "rotateNow": "1"})
    assert_refused(restricted, wait_for, "secretrotations", "app", "secrets")


def test_restore_without_policy_get_says_so(restricted: Restricted, wait_for: Callable[..., Any]) -> None:
    restricted.grant(without(SHIPPED_ROLE, GROUP, "backuppolicies", "get"))
    restricted.start()
    restricted.create("backuprestores", "again", {"policyRef": "db", "dryRun": True})
    assert_refused(restricted, wait_for, "backuprestores", "again", "backuppolicies")
