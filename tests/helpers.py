"""Small helpers shared by the test tiers (no fixtures here)."""

from __future__ import annotations

import copy
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes
import yaml

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "deploy" / "samples"


def load_samples() -> dict[str, dict[str, Any]]:
    """Every sample CR keyed by file stem."""
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(SAMPLES.rglob("*.yaml"))}


def with_change(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``obj`` with the dotted ``path`` set to ``value`` (``DELETE`` removes it)."""
    out = copy.deepcopy(obj)
    node: Any = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


DELETE = object()


def printed_columns(api: kubernetes.client.ApiClient, namespace: str, plural: str) -> dict[str, Any]:
    """What ``kubectl get <plural>`` prints for the first object: the server-side Table."""
    headers = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
    token = api.configuration.get_api_key_with_prefix("BearerToken")
    if token:
        headers["Authorization"] = token
    url = f"{api.configuration.host}/apis/runbook.dev/v1alpha1/namespaces/{namespace}/{plural}"
    response = json.loads(api.rest_client.request("GET", url, headers=headers).data)
    names = [c["name"] for c in response["columnDefinitions"]]
    return dict(zip(names, response["rows"][0]["cells"], strict=True))


def server_side_apply(api: kubernetes.client.ApiClient, documents: list[dict[str, Any]]) -> None:
    """``kubectl apply --server-side`` of the manifests, through the admin client."""
    dynamic = kubernetes.dynamic.DynamicClient(api)
    for doc in documents:
        resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        namespace = doc["metadata"].get("namespace")
        resource.server_side_apply(body=doc, namespace=namespace, field_manager="runbook-tests", force_conflicts=True)


NAMESPACE_ENABLE = ROOT / "deploy" / "base" / "namespace-enable" / "enable.yaml"


def enabling_bundle(namespace: str) -> list[dict[str, Any]]:
    """deploy/base/namespace-enable/'s objects for ``namespace``, as kustomize's ``namespace:`` makes them:
    every object there, every ServiceAccount subject without a namespace pointed there."""
    documents = [doc for doc in yaml.safe_load_all(NAMESPACE_ENABLE.read_text()) if doc]
    for doc in documents:
        doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects") or []:
            subject.setdefault("namespace", namespace)
    return documents


def enable_namespace(api: kubernetes.client.ApiClient, namespace: str) -> None:
    """What a cluster administrator does to let the operator act in ``namespace``: create the enabling bundle
    there (the operator's RoleBinding, the export and restore agents' ServiceAccounts and RoleBindings)."""
    core, rbac = kubernetes.client.CoreV1Api(api), kubernetes.client.RbacAuthorizationV1Api(api)
    for doc in enabling_bundle(namespace):
        if doc["kind"] == "ServiceAccount":
            core.create_namespaced_service_account(namespace, doc)
        else:
            rbac.create_namespaced_role_binding(namespace, doc)


def token_kubeconfig(kubeconfig: Path, token: str, path: Path) -> Path:
    """A copy of ``kubeconfig`` whose current context authenticates with the bearer ``token`` only."""
    config = yaml.safe_load(kubeconfig.read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])["context"]
    config["users"] = [{"name": "token", "user": {"token": token}}]
    context["user"] = "token"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class OperatorProcess:
    """``runbook-operator run`` as its own process, as the Deployment runs it."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, *, extra_args: tuple[str, ...] = ()) -> None:
        self.args = [
            sys.executable,
            "-m",
            "runbook_operator.cli",
            "run",
            *extra_args,
            "--namespace",
            namespace,
            "--health-port",
            "0",
        ]
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "RUNBOOK_METRICS_PORT": "0"}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def terminate(self) -> None:
        """Stop as the kubelet stops a pod: SIGTERM, then SIGKILL after a grace period."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def grants_for_test(
    namespace: str, *, hosts: list[tuple[str, int]] | None = None, plaintext: bool = True, **spec: Any
) -> Any:
    """``Context.grants`` for unit specification tests: one RunbookGrant ``test`` for ``namespace`` allowing
    ``hosts`` ((host, port) pairs), connections without TLS (``plaintext``) and any other RunbookGrant fields."""
    from runbook_operator.models.grants import RunbookGrantSpec
    from runbook_operator.reconcilers.tenancy import Grant

    grant = Grant(
        "test",
        RunbookGrantSpec.model_validate(
            {
                "namespaces": [namespace],
                "hosts": [{"host": host, "port": port} for host, port in hosts or []],
                "plaintextConnections": plaintext,
                **spec,
            }
        ),
    )
    return lambda asked: (grant,) if asked == namespace else ()


DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def image_env(dockerfile: Path = DOCKERFILE) -> dict[str, str]:
    """The variables the image's ENV lines set (its last stage; ``ENV K=V ...`` form)."""
    stage = dockerfile.read_text().split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for line in stage.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[len("ENV ") :]):
                name, equals, value = word.partition("=")
                assert equals, f"{dockerfile}: ENV {word!r}: expected NAME=value"
                env[name] = value
    return env
