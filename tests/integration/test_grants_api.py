"""RunbookGrant on the real API server: cluster-scoped, so a namespace user (even one who may do anything with
runbook.dev objects, and the namespace's admin) cannot create, change or read one; the operator may only read
them; the schema (OpenAPI and CEL) rejects bad input with a message naming the field."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import pytest
from tests.helpers import load_samples, token_kubeconfig, with_change

import runbook_operator.main
from runbook_operator.models import GROUP, VERSION
from runbook_operator.reconcilers import tenancy

pytestmark = pytest.mark.integration
PLURAL = "runbookgrants"
OPERATOR = "system:serviceaccount:runbook-system:runbook-operator"
OPERATOR_ARGS = ["run", "--standalone", "-m", "runbook_operator.main"]
SAMPLE = load_samples()["runbookgrant"]


def grant(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RunbookGrant", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def grants(api: kubernetes.client.ApiClient, crds_installed: list[str]) -> Iterator[list[str]]:
    """Names of the grants a test created (as admin), deleted afterwards: grants outlive namespaces."""
    created: list[str] = []
    yield created
    objects = kubernetes.client.CustomObjectsApi(api)
    for name in created:
        try:
            objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise


@pytest.fixture
def tenant(
    api: kubernetes.client.ApiClient, kubeconfig: Path, namespace: str, tmp_path: Path
) -> kubernetes.client.ApiClient:
    """A client authenticated as a ServiceAccount of ``namespace`` that may do anything with runbook.dev
    objects there and is the namespace's admin (the built-in ``admin`` ClusterRole bound in the namespace)."""
    core = kubernetes.client.CoreV1Api(api)
    rbac = kubernetes.client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "tenant"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "runbook-edit"},
            "rules": [{"apiGroups": [GROUP], "resources": ["*"], "verbs": ["*"]}],
        },
    )
    subject = [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}]
    for name, kind in (("runbook-edit", "Role"), ("admin", "ClusterRole")):
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": f"tenant-{name}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
                "subjects": subject,
            },
        )
    token = core.create_namespaced_service_account_token(
        "tenant", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    config = token_kubeconfig(kubeconfig, token, tmp_path / "tenant-kubeconfig")
    return kubernetes.config.new_client_from_config(config_file=str(config))


def test_a_tenant_may_not_create_change_or_read_a_grant(
    api: kubernetes.client.ApiClient,
    tenant: kubernetes.client.ApiClient,
    namespace: str,
    grants: list[str],
    tmp_path: Path,
) -> None:
    mine = kubernetes.client.CustomObjectsApi(tenant)
    # The tenant's rights on runbook.dev objects of its namespace are real: it may create a BackupRestore.
    restore = with_change(load_samples()["backuprestore"], "metadata.namespace", namespace)
    assert mine.create_namespaced_custom_object(GROUP, VERSION, namespace, "backuprestores", restore)["metadata"]
    # A grant for its own namespace, the widest one there could be: refused.
    widest = grant(
        f"{namespace}-self",
        {
            "namespaces": [namespace],
            "s3": [{"endpoint": "https://s3.attacker.example", "buckets": ["loot"], "ambientCredentials": True}],
            "hosts": [{"host": "db.attacker.example", "port": 5432}],
            "exportNamespaces": ["kube-system", "runbook-system"],
            "plaintextConnections": True,
        },
    )
    with pytest.raises(kubernetes.client.ApiException) as created:
        mine.create_cluster_custom_object(GROUP, VERSION, PLURAL, widest)
    assert created.value.status == 403
    # Nor through the namespaced path (the kind has none).
    with pytest.raises(kubernetes.client.ApiException) as namespaced:
        mine.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widest)
    assert namespaced.value.status == 404
    # An administrator's grant for the tenant's namespace: the tenant cannot read, list, widen or delete it.
    name = f"{namespace}-admin"
    kubernetes.client.CustomObjectsApi(api).create_cluster_custom_object(
        GROUP, VERSION, PLURAL, grant(name, {"namespaces": [namespace]})
    )
    grants.append(name)
    attempts = {
        "get": lambda: mine.get_cluster_custom_object(GROUP, VERSION, PLURAL, name),
        "list": lambda: mine.list_cluster_custom_object(GROUP, VERSION, PLURAL),
        "patch": lambda: mine.patch_cluster_custom_object(
            GROUP, VERSION, PLURAL, name, {"spec": {"plaintextConnections": True}}
        ),
        "patch status": lambda: mine.patch_cluster_custom_object_status(
            GROUP, VERSION, PLURAL, name, {"status": {"phase": "x"}}
        ),
        "delete": lambda: mine.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name),
    }
    for verb, attempt in attempts.items():
        with pytest.raises(kubernetes.client.ApiException) as refused:
            attempt()
        assert refused.value.status == 403, verb
    stored = kubernetes.client.CustomObjectsApi(api).get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    assert stored["spec"] == {"namespaces": [namespace], "plaintextConnections": False}
    # The kind is not in the runbook category, so the tenant's `kubectl get runbook` still works.
    listed = subprocess.run(
        ["kubectl", "--kubeconfig", str(tmp_path / "tenant-kubeconfig"), "get", "runbook", "-n", namespace],
        capture_output=True,
        text=True,
        check=False,
    )
    assert listed.returncode == 0 and "restore-latest" in listed.stdout, listed.stderr


def allowed(api: kubernetes.client.ApiClient, user: str, verb: str, *, subresource: str = "") -> bool:
    review = kubernetes.client.AuthorizationV1Api(api).create_subject_access_review(
        {
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", "system:serviceaccounts:runbook-system", "system:authenticated"],
                "resourceAttributes": {
                    "group": GROUP,
                    "resource": PLURAL,
                    "verb": verb,
                    "subresource": subresource,
                },
            }
        }
    )
    return bool(review.status.allowed)


def test_the_operator_may_only_read_grants(api: kubernetes.client.ApiClient, operator_kubeconfig: Path) -> None:
    """deploy/base's ClusterRole (the operator_kubeconfig fixture applied it): get/list/watch, no write."""
    assert [v for v in ("get", "list", "watch") if not allowed(api, OPERATOR, v)] == []
    writes = ["create", "update", "patch", "delete", "deletecollection"]
    assert [v for v in writes if allowed(api, OPERATOR, v)] == []
    assert [v for v in ("update", "patch") if allowed(api, OPERATOR, v, subresource="status")] == []


def test_the_sample_applies_and_prints_its_columns(
    api: kubernetes.client.ApiClient, namespace: str, grants: list[str]
) -> None:
    name = f"{namespace}-sample"
    created = kubernetes.client.CustomObjectsApi(api).create_cluster_custom_object(
        GROUP, VERSION, PLURAL, with_change(SAMPLE, "metadata.name", name)
    )
    grants.append(name)
    assert "namespace" not in created["metadata"]
    url = f"{api.configuration.host}/apis/{GROUP}/{VERSION}/{PLURAL}/{name}"
    headers = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
    token = api.configuration.get_api_key_with_prefix("BearerToken")
    if token:
        headers["Authorization"] = token
    table = json.loads(api.rest_client.request("GET", url, headers=headers).data)
    cells = dict(zip([c["name"] for c in table["columnDefinitions"]], table["rows"][0]["cells"], strict=True))
    assert cells["Namespaces"] == '["hungryhippaahneties"]'
    assert cells["Hosts"] == "postgresql-reporting.platform-db.svc"
    assert cells["S3"] == "http://s3.storage.svc:5000"
    assert cells["Plaintext"] is True  # the dev runbook's PostgreSQL has no TLS yet


VALID = {"namespaces": ["team-a"]}
REJECTED: list[tuple[dict[str, Any], str]] = [
    ({}, "spec.namespaces"),
    ({"namespaces": []}, "spec.namespaces"),
    ({"namespaces": ["Team_A"]}, "spec.namespaces[0]"),
    ({**VALID, "hosts": [{"host": "db.x", "port": 0}]}, "spec.hosts[0].port"),
    ({**VALID, "hosts": [{"host": "db.x", "port": 65536}]}, "spec.hosts[0].port"),
    ({**VALID, "hosts": [{"host": "db.x"}]}, "spec.hosts[0].port"),
    ({**VALID, "hosts": [{"host": "DB.x", "port": 1}]}, "spec.hosts[0].host"),
    ({**VALID, "hosts": [{"host": "db:5432", "port": 1}]}, "spec.hosts[0].host"),
    ({**VALID, "hosts": [{"host": "a@db", "port": 1}]}, "spec.hosts[0].host"),
    ({**VALID, "hosts": [{"host": "127.1", "port": 1}]}, "non-standard form"),
    ({**VALID, "hosts": [{"host": "0x7f.1", "port": 1}]}, "non-standard form"),
    ({**VALID, "hosts": [{"host": "2130706433", "port": 1}]}, "non-standard form"),
    ({**VALID, "hosts": [{"host": "127.0.0.01", "port": 1}]}, "non-standard form"),
    ({**VALID, "hosts": [{"host": "1.2.3.4.5", "port": 1}]}, "last label cannot be a number"),
    ({**VALID, "hosts": [{"host": "fd00:0::1", "port": 1}]}, "an IPv6 address in canonical form"),
    ({**VALID, "s3": [{"endpoint": "https://minio/path"}]}, "spec.s3[0].endpoint"),
    ({**VALID, "s3": [{"endpoint": "https://user:pw@minio"}]}, "spec.s3[0].endpoint"),
    ({**VALID, "s3": [{"endpoint": "ftp://minio"}]}, "spec.s3[0].endpoint"),
    ({**VALID, "s3": [{"endpoint": "https://minio:70000"}]}, "spec.s3[0].endpoint"),
    ({**VALID, "s3": [{"buckets": ["Bad_Bucket"]}]}, "spec.s3[0].buckets[0]"),
    ({**VALID, "s3": [{"ambientCredentials": True}]}, "ambientCredentials needs buckets"),
    ({**VALID, "exportNamespaces": ["kube system"]}, "spec.exportNamespaces[0]"),
    ({**VALID, "plaintextConnections": "yes"}, "spec.plaintextConnections"),
]


@pytest.mark.parametrize(("spec", "expected"), REJECTED, ids=lambda v: str(v)[:60])
def test_the_schema_rejects_bad_input_naming_the_field(
    api: kubernetes.client.ApiClient, crds_installed: list[str], namespace: str, spec: dict[str, Any], expected: str
) -> None:
    with pytest.raises(kubernetes.client.ApiException) as info:
        kubernetes.client.CustomObjectsApi(api).create_cluster_custom_object(
            GROUP, VERSION, PLURAL, grant(f"{namespace}-bad", spec)
        )
    assert info.value.status == 422, info.value.body
    assert expected in info.value.body


def test_valid_addresses_and_endpoints_are_accepted(
    api: kubernetes.client.ApiClient, namespace: str, grants: list[str]
) -> None:
    name = f"{namespace}-valid"
    spec = {
        "namespaces": ["team-a", "team-b"],
        "hosts": [
            {"host": "10.0.0.5", "port": 5432},
            {"host": "fd00::5", "port": 6379},
            {"host": "db.shared.example", "port": 65535},
            {"host": "postgresql.team-b.svc", "port": 1},
        ],
        "s3": [
            {"endpoint": "https://minio.storage:9000", "buckets": ["team-a-backups"]},
            {"endpoint": "http://[fd00::9]:9000"},
            {"buckets": ["team-a-aws"], "ambientCredentials": True},
        ],
        "exportNamespaces": ["team-a-jobs"],
    }
    created = kubernetes.client.CustomObjectsApi(api).create_cluster_custom_object(
        GROUP, VERSION, PLURAL, grant(name, spec)
    )
    grants.append(name)
    assert created["spec"]["hosts"] == spec["hosts"] and created["spec"]["plaintextConnections"] is False
    assert created["spec"]["s3"][0]["ambientCredentials"] is False


def test_the_operator_indexes_grants_and_still_serves_every_kind(
    api: kubernetes.client.ApiClient,
    namespace: str,
    grants: list[str],
    monkeypatch: pytest.MonkeyPatch,
    wait_for: Callable[..., Any],
) -> None:
    """main.py's index over the cluster-scoped grants with the shipped RBAC, the operator serving one namespace:
    kopf holds every handler until its indexes are filled, so a handled EmergencyIsolation shows it was."""
    seen: dict[str, list[tenancy.Grant]] = {}  # the namespace fixture's own grant is indexed too

    def recording(name: str, spec: Any) -> dict[str, tenancy.Grant]:
        entries = tenancy.index_entries(name, spec)
        for listed, entry in entries.items():
            seen.setdefault(listed, []).append(entry)
        return entries

    monkeypatch.setattr(runbook_operator.main, "index_entries", recording)
    name = f"{namespace}-indexed"
    kubernetes.client.CustomObjectsApi(api).create_cluster_custom_object(
        GROUP, VERSION, PLURAL, grant(name, {"namespaces": [namespace], "exportNamespaces": ["team-a-jobs"]})
    )
    grants.append(name)
    isolation = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "EmergencyIsolation",
        "metadata": {"name": "probe", "namespace": namespace},
        "spec": {
            "reason": "index probe",
            "incidentId": "INC-1",
            "scaleToZero": {"keepRunning": {"matchLabels": {"app name": "x"}}},  # Invalid: nothing acts
        },
    }
    objects = kubernetes.client.CustomObjectsApi(api)
    with kopf.testing.KopfRunner([*OPERATOR_ARGS, "--namespace", namespace], timeout=60) as runner:
        indexed = lambda: [g for g in seen.get(namespace, []) if g.name == name]  # noqa: E731
        wait_for(indexed, timeout=30, what="the grant in the operator's index")
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, "emergencyisolations", isolation)
        wait_for(
            lambda: (
                (
                    objects.get_namespaced_custom_object(GROUP, VERSION, namespace, "emergencyisolations", "probe").get(
                        "status"
                    )
                    or {}
                ).get("phase")
                == "Invalid"
            ),
            timeout=60,
            what="the EmergencyIsolation handled",
        )
        objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, "emergencyisolations", "probe")
    assert [g.spec.export_namespaces for g in indexed()] == [["team-a-jobs"]]
    refused = [line for line in runner.output.splitlines() if "runbookgrants" in line and "403" in line]
    assert refused == [], runner.output
