"""What the e2e tests share: the cluster with its real node, kubectl, and waiting with diagnostics.

The tests import this module; conftest.py holds the fixtures that set the cluster up once for the tier.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import kubernetes
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tools" / "localcluster"))
sys.path.insert(0, str(REPO_ROOT / "tools" / "image"))

import image as image_tool  # noqa: E402 - found through the sys.path entries above
import localcluster  # noqa: E402

NAMESPACE = "hungryhippaahneties"
OPERATOR_NAMESPACE = "runbook-system"
OVERLAY = REPO_ROOT / "deploy" / "overlays" / "e2e"
PLATFORM = REPO_ROOT / "deploy" / "dev" / "platform"
STORAGE_NAMESPACE = "storage"  # the S3 server's (deploy/dev/platform/storage/), outside the isolated namespace
S3_ENDPOINT = f"http://s3.{STORAGE_NAMESPACE}.svc:5000"
BACKUP_BUCKET = "hungryhippaahneties-backups"
EVIDENCE_BUCKET = "hungryhippaahneties-evidence"
APP_PORT = 8080
GROUP, VERSION = "runbook.dev", "v1alpha1"

__all__ = ["image_tool", "localcluster"]


@dataclass
class E2E:
    """The tier's cluster: a real node running deploy/overlays/e2e's operator and deploy/dev/platform."""

    cluster: localcluster.LocalCluster
    api: kubernetes.client.ApiClient
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    @property
    def apps(self) -> kubernetes.client.AppsV1Api:
        return kubernetes.client.AppsV1Api(self.api)

    @property
    def batch(self) -> kubernetes.client.BatchV1Api:
        return kubernetes.client.BatchV1Api(self.api)

    @property
    def networking(self) -> kubernetes.client.NetworkingV1Api:
        return kubernetes.client.NetworkingV1Api(self.api)

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.api)

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """kubectl against the cluster; the caller checks the result."""
        return subprocess.run(
            [str(localcluster.bin_dir() / "kubectl"), f"--kubeconfig={self.cluster.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def must(self, *args: str, stdin: str | None = None, timeout: float = 180) -> str:
        result = self.kubectl(*args, stdin=stdin, timeout=timeout)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr.strip()}"
        return result.stdout

    def exec_in(self, pod: str, *command: str, namespace: str = NAMESPACE) -> subprocess.CompletedProcess[str]:
        return self.kubectl("-n", namespace, "exec", pod, "--", *command, timeout=60)

    def diagnostics(self, namespace: str = NAMESPACE) -> str:
        """Pods and recent events of a namespace, for a failure message."""
        pods = self.kubectl("-n", namespace, "get", "pods", "-o", "wide").stdout
        events = self.kubectl("-n", namespace, "get", "events", "--sort-by=.lastTimestamp").stdout
        return f"{pods}\n{events[-4000:]}"

    def wait(self, condition: Callable[[], Any], *, timeout: float, what: str, namespace: str = NAMESPACE) -> Any:
        """Poll ``condition`` until it is truthy; fail after ``timeout`` s with the namespace's pods and events."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{self.diagnostics(namespace)}")
            time.sleep(1)

    def ready_pods(self, selector: str, namespace: str = NAMESPACE) -> list[Any]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return [
            p
            for p in pods
            if p.metadata.deletion_timestamp is None
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]

    def custom_object(self, plural: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name))

    def create_custom(self, plural: str, body: dict[str, Any], namespace: str = NAMESPACE) -> None:
        kind = body["kind"]
        full = {"apiVersion": f"{GROUP}/{VERSION}", **body, "kind": kind}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, full)

    def condition(self, plural: str, name: str, kind: str) -> dict[str, Any] | None:
        status = self.custom_object(plural, name).get("status") or {}
        return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def run_pod(
    e2e: E2E, name: str, args: list[str], *, namespace: str = NAMESPACE, image: str = localcluster.TEST_IMAGE
) -> Any:
    """A long-running pod of the test image (e.g. ``serve``, or ``sleep``-like clients); returns it once Ready or
    Running."""
    e2e.core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": name, "labels": {"e2e-client": name}},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent", "args": args}],
            },
        },
    )
    return e2e.wait(
        lambda: (p := e2e.core.read_namespaced_pod(name, namespace)).status.phase == "Running" and p,
        timeout=120,
        what=f"pod {name} Running",
        namespace=namespace,
    )


def pod_log(e2e: E2E, pod: str, namespace: str = NAMESPACE, container: str | None = None) -> str:
    kwargs = {"container": container} if container else {}
    return str(e2e.core.read_namespaced_pod_log(pod, namespace, _preload_content=False, **kwargs).data.decode())


def events_of(e2e: E2E, name: str, namespace: str = NAMESPACE) -> str:
    events = e2e.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return json.dumps([f"{e.reason}: {e.message}" for e in events])


def s3_client(e2e: E2E) -> Any:
    """boto3 on the S3 server pod's address (the host reaches pods over the node's bridge)."""
    (pod,) = e2e.ready_pods("app=s3", namespace=STORAGE_NAMESPACE)
    return boto3.client(
        "s3",
        endpoint_url=f"http://{pod.status.pod_ip}:5000",
        region_name="us-east-1",
        aws_access_key_id="dev-access-key",
        aws_secret_access_key="dev-secret-key",
    )
