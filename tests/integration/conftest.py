"""Fixtures of the integration tier: a real Kubernetes API server.

By default a local control plane (tools/localcluster) is started once per session; it needs the cached
binaries, which `python tools/localcluster/localcluster.py build` makes (the first build takes long).
To test against your own cluster instead, give its kubeconfig with RUNBOOK_TEST_KUBECONFIG=PATH or
--kubeconfig=PATH (the option works when pytest is pointed at tests/integration).
If the local cluster cannot start, the tests error out: they are never skipped.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import pytest
import yaml
from tests.conftest import SHARED_SERVERS
from tests.helpers import enable_namespace, server_side_apply, token_kubeconfig
from tests.services import S3Server

import runbook_operator.main

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"
sys.path.insert(0, str(REPO_ROOT / "tools" / "localcluster"))

import localcluster  # noqa: E402 - found through the sys.path entry above

OPERATOR_ARGS = ["run", "--standalone", "-m", "runbook_operator.main"]


def poll_until(condition: Any, *, timeout: float = 60.0, interval: float = 0.25, what: str = "condition") -> Any:
    """Poll condition() until it returns something truthy; return that, or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., Any]:
    """poll_until, for test modules (they cannot import from conftest reliably)."""
    return poll_until


@pytest.fixture(scope="session")
def local_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[localcluster.LocalCluster | None]:
    """The started local control plane, or None when the tests run against a user-given cluster."""
    if request.config.getoption("--kubeconfig", default=None) or os.environ.get("RUNBOOK_TEST_KUBECONFIG"):
        yield None
        return
    cluster = localcluster.LocalCluster(tmp_path_factory.mktemp("localcluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kubeconfig(request: pytest.FixtureRequest, local_cluster: localcluster.LocalCluster | None) -> Path:
    """Path of the kubeconfig of the cluster under test."""
    if local_cluster is not None:
        return local_cluster.kubeconfig
    given = request.config.getoption("--kubeconfig", default=None) or os.environ["RUNBOOK_TEST_KUBECONFIG"]
    path = Path(given).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"kubeconfig {path} (from --kubeconfig or RUNBOOK_TEST_KUBECONFIG) does not exist")
    return path


@pytest.fixture(scope="session")
def api(kubeconfig: Path) -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def crds_installed(api: kubernetes.client.ApiClient) -> list[str]:
    """Create or update every CustomResourceDefinition in crds/ and wait until each is Established."""
    documents = [
        doc
        for path in sorted(CRD_DIR.glob("*.y*ml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "CustomResourceDefinition"
    ]
    assert documents, f"no CustomResourceDefinition manifests in {CRD_DIR}"
    extensions = kubernetes.client.ApiextensionsV1Api(api)
    for doc in documents:
        name = doc["metadata"]["name"]
        try:
            extensions.create_custom_resource_definition(doc)
        except kubernetes.client.ApiException as error:
            if error.status != 409:
                raise
            doc["metadata"]["resourceVersion"] = extensions.read_custom_resource_definition(
                name
            ).metadata.resource_version
            extensions.replace_custom_resource_definition(name, doc)

    def established(name: str) -> bool:
        conditions = extensions.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    names = [doc["metadata"]["name"] for doc in documents]
    for name in names:
        poll_until(lambda name=name: established(name), timeout=30, what=f"CRD {name} to be Established")
    return names


GRANTS = ("runbook.dev", "v1alpha1", "runbookgrants")


def grant(
    api: kubernetes.client.ApiClient,
    namespace: str,
    *,
    name: str | None = None,
    hosts: Sequence[tuple[str, int]] = (),
    endpoints: Sequence[str] = (),
    plaintext: bool = True,
    **spec: Any,
) -> str:
    """A RunbookGrant (as a cluster administrator makes one) for ``namespace``: ``hosts`` ((host, port)),
    S3 ``endpoints`` (any bucket, keys from the namespace's Secret), ``plaintextConnections`` and any other
    field; owned by the Namespace, so it goes when the namespace does. Returns its name."""
    ns = kubernetes.client.CoreV1Api(api).read_namespace(namespace)
    grant_name = name or f"{namespace}-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": "runbook.dev/v1alpha1",
        "kind": "RunbookGrant",
        "metadata": {
            "name": grant_name,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Namespace", "name": namespace, "uid": ns.metadata.uid}],
        },
        "spec": {
            "namespaces": [namespace],
            "hosts": [{"host": host, "port": port} for host, port in hosts],
            "s3": [{"endpoint": endpoint} for endpoint in endpoints],
            "plaintextConnections": plaintext,
            **spec,
        },
    }
    kubernetes.client.CustomObjectsApi(api).create_cluster_custom_object(*GRANTS, body)
    return grant_name


def grant_test_services(api: kubernetes.client.ApiClient, namespace: str) -> str:
    """The grant a test namespace needs for the session's shared servers (tests/conftest.py's PostgreSQL,
    Redis and S3 server on 127.0.0.1, as far as this test's fixtures started them) and plaintext connections.
    A test that starts a server of its own grants it with ``grant``."""
    hosts = [(server.host, server.port) for server in SHARED_SERVERS if not isinstance(server, S3Server)]
    endpoints = [server.endpoint for server in SHARED_SERVERS if isinstance(server, S3Server)]
    return grant(api, namespace, name=f"{namespace}-shared", hosts=hosts, endpoints=endpoints)


@contextlib.contextmanager
def enabled_namespace(api: kubernetes.client.ApiClient) -> Iterator[str]:
    """A fresh namespace, enabled for the operator as an administrator would and granted the session's shared
    servers (``grant_test_services``), deleted afterwards."""
    core = kubernetes.client.CoreV1Api(api)
    name = f"rb-test-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"runbook.dev/test": "true"}}})
    enable_namespace(api, name)
    grant_test_services(api, name)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise


@pytest.fixture
def namespace(api: kubernetes.client.ApiClient) -> Iterator[str]:
    """A fresh namespace for one test (``enabled_namespace``)."""
    with enabled_namespace(api) as name:
        yield name


@pytest.fixture(scope="session")
def operator_kubeconfig(
    api: kubernetes.client.ApiClient,
    kubeconfig: Path,
    crds_installed: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A kubeconfig that authenticates as deploy/'s ServiceAccount with a real token (TokenRequest), after
    installing deploy/base's namespace, ServiceAccount, ClusterRoles and binding as `kubectl apply -k deploy/`
    would: every operator the tests run holds exactly the shipped RBAC, never the admin's (its namespaced
    permissions only where the ``namespace`` fixture enabled it)."""
    documents = [
        doc
        for name in ("namespace.yaml", "rbac.yaml", "agent-rbac.yaml")
        for doc in yaml.safe_load_all((REPO_ROOT / "deploy" / "base" / name).read_text())
        if doc
    ]
    server_side_apply(api, documents)
    account = next(doc for doc in documents if doc["kind"] == "ServiceAccount")["metadata"]
    token = (
        kubernetes.client.CoreV1Api(api)
        .create_namespaced_service_account_token(
            account["name"], account["namespace"], {"spec": {"expirationSeconds": 12 * 3600}}
        )
        .status.token
    )
    return token_kubeconfig(kubeconfig, token, tmp_path_factory.mktemp("operator") / "kubeconfig")


@pytest.fixture(autouse=True)
def _in_process_operator(operator_kubeconfig: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets tests run the operator in-process, more than once: no metrics port is bound (a second runner
    would find it taken), and the kubernetes library, which reads $KUBECONFIG once at import, defaults to
    the operator's ServiceAccount on the cluster under test (kopf's login and our client both use that
    default; the tests' own client, ``api``, stays the admin's)."""
    monkeypatch.setattr(runbook_operator.main.SETTINGS, "metrics_port", 0)
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(operator_kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(operator_kubeconfig))


@pytest.fixture
def operator_runner(namespace: str) -> Iterator[kopf.testing.KopfRunner]:
    """The operator running in-process (kopf's own runner), watching only the test's namespace."""
    with kopf.testing.KopfRunner([*OPERATOR_ARGS, "--namespace", namespace], timeout=60) as runner:
        yield runner
