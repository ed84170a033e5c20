"""Evidence of 300 MiB of container logs, read through the real API server's pod log endpoint, captured by a
process holding the operator's modules with its peak RSS under 150 MiB (issue 14).

The logs come from a kwok of this test's own: it plays the kubelet of one node (its kubelet endpoint on
127.0.0.1, TLS with the local control plane's serving certificate, which the API server does not verify) and
serves every container of the test's pods the same CRI log file. The capture runs in a child process that
first imports ``runbook_operator.main`` (the operator's footprint before any work), so its peak RSS (VmHWM,
reset just before the capture: ``ru_maxrss`` would include the forking pytest's) is what an operator reaches.
The child runs with the environment the operator's image sets (the Dockerfile's ENV lines: its glibc malloc
settings decide how much of the memory freed during the capture stays resident).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from tests.helpers import image_env
from tests.services import GpgKeyring, S3Server, free_port

import localcluster

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
PODS = 20  # one container each; 20 x 15 MiB = 300 MiB of logs (the capture reads at most 16 MiB per log)
LOG_BYTES = 15 * MIB  # what the log endpoint returns per container (with timestamps)
RSS_LIMIT_MIB = 150
NODE = "evidence-node"
ANNOTATION = "kwok.x-k8s.io/node"
TIMESTAMP = "2026-01-01T00:00:00.000000000Z"

KWOK_CONFIG = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {{name: evidence-node-ready}}
spec:
  resourceRef: {{apiGroup: v1, kind: Node}}
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select(.type == "Ready") | .status'
      operator: NotIn
      values: ['True']
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      conditions:
      - {{type: Ready, status: "True", reason: KubeletReady, message: kwok, lastHeartbeatTime: {{{{ $now | Quote }}}},
         lastTransitionTime: {{{{ $now | Quote }}}}}}
      addresses:
      - {{type: InternalIP, address: 127.0.0.1}}
      daemonEndpoints:
        kubeletEndpoint: {{Port: {port}}}
      capacity: {{cpu: "32", memory: 128Gi, pods: "110"}}
      allocatable: {{cpu: "32", memory: 128Gi, pods: "110"}}
      nodeInfo: {{architecture: amd64, operatingSystem: linux, kubeletVersion: fake}}
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {{name: evidence-pod-running}}
spec:
  resourceRef: {{apiGroup: v1, kind: Pod}}
  selector:
    matchExpressions:
    - {{key: .metadata.deletionTimestamp, operator: DoesNotExist}}
    - {{key: .status.phase, operator: In, values: [Pending]}}
  next:
    statusTemplate: |
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {{name: evidence-pod-gone}}
spec:
  resourceRef: {{apiGroup: v1, kind: Pod}}
  selector:
    matchExpressions:
    - {{key: .metadata.deletionTimestamp, operator: Exists}}
  next:
    delete: true
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterLogs
metadata: {{name: evidence}}
spec:
  selector: {{matchNamespaces: [{namespace}]}}
  logs:
  - logsFile: {logs}
    previousLogsFile: {previous}
"""

CHILD = """
import json, sys
import kubernetes
import runbook_operator.main  # the operator's modules: its footprint before any work
from runbook_operator.clients.kube import KubeApi
from runbook_operator.models.isolation import EvidenceCapture
from runbook_operator.reconcilers import evidence


def status(field):  # kB; VmHWM is the peak RSS since the process started or since clear_refs reset it
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


body, settings, kubeconfig = json.loads(sys.stdin.read())
api = KubeApi(kubernetes.config.new_client_from_config(config_file=kubeconfig))
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # VmHWM := VmRSS now
baseline = status("VmRSS")
record = evidence.capture(
    api, body, EvidenceCapture.model_validate(settings), requester="test", on_collected=lambda: None
)
print(json.dumps({"baseline_kib": baseline, "peak_kib": status("VmHWM"), "record": record.model_dump(mode="json")}))
"""


def write_cri_log(path: Path, size: int) -> tuple[bytes, str]:
    """A CRI log file whose content, as the log endpoint returns it with timestamps, is ``size`` bytes of varied
    lines (compressible as text logs are); returns its first 200 bytes and its SHA-256, as returned."""
    returned, head, total, index = hashlib.sha256(), b"", 0, 0
    with path.open("w") as out:
        while total < size:
            content = f'level=info msg="GET /api/orders/{index * 7919 % 100003}" user={uuid.uuid4()} ms={index % 97}'
            if total + len(TIMESTAMP) + len(content) + 2 > size:
                content = "x" * (size - total - len(TIMESTAMP) - 2)
            line = f"{TIMESTAMP} {content}\n".encode()
            out.write(f"{TIMESTAMP} stdout F {content}\n")
            returned.update(line)
            head = (head + line)[:200]
            total += len(line)
            index += 1
    return head, returned.hexdigest()


@pytest.fixture
def log_node(
    local_cluster: localcluster.LocalCluster | None,
    api: kubernetes.client.ApiClient,
    namespace: str,
    tmp_path: Path,
    wait_for: Callable[..., Any],
) -> Iterator[tuple[bytes, str]]:
    """A node whose kubelet (a kwok of this test's own) serves 15 MiB logs to every container in ``namespace``."""
    if local_cluster is None:
        pytest.skip("starts a kwok next to the local control plane's own; not possible on a user-given cluster")
    served = write_cri_log(tmp_path / "current.log", LOG_BYTES)
    (tmp_path / "previous.log").write_text(f"{TIMESTAMP} stdout F last run\n")
    port = free_port()
    config = tmp_path / "kwok.yaml"
    config.write_text(
        KWOK_CONFIG.format(
            port=port, namespace=namespace, logs=tmp_path / "current.log", previous=tmp_path / "previous.log"
        )
    )
    state, pki = local_cluster.state_dir, local_cluster.pki
    kwok = subprocess.Popen(
        [
            str(localcluster.build() / "kwok"),
            f"--kubeconfig={state / 'kwok.kubeconfig'}",
            f"--config={config}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={ANNOTATION}=evidence",
            f"--server-address=127.0.0.1:{port}",
            f"--tls-cert-file={pki.path('apiserver.crt')}",
            f"--tls-private-key-file={pki.path('apiserver.key')}",
            "--node-ip=127.0.0.1",
            "--node-lease-duration-seconds=0",
        ],
        stdout=(tmp_path / "kwok.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    core = kubernetes.client.CoreV1Api(api)
    try:
        core.create_node({"metadata": {"name": NODE, "annotations": {ANNOTATION: "evidence"}}})

        def ready() -> bool:
            conditions = core.read_node(NODE).status.conditions or []
            return any(c.type == "Ready" and c.status == "True" for c in conditions)

        wait_for(ready, timeout=60, what=f"node {NODE} Ready")
        for index in range(PODS):
            core.create_namespaced_pod(
                namespace,
                {
                    "metadata": {"name": f"chatty-{index:02}"},
                    "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "busybox"}]},
                },
            )
        yield served
    finally:
        core.delete_node(NODE)
        kwok.terminate()
        kwok.wait(10)


def test_300_mib_of_logs_are_captured_with_the_operator_under_150_mib(
    log_node: tuple[bytes, str],
    kubeconfig: Path,
    api: kubernetes.client.ApiClient,
    namespace: str,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
) -> None:
    core = kubernetes.client.CoreV1Api(api)
    # The API server reaches this test's kubelet: a log through the real pod log endpoint.
    head = core.read_namespaced_pod_log(
        "chatty-00", namespace, container="app", timestamps=True, limit_bytes=200, _preload_content=False
    ).data
    assert head == log_node[0]

    bucket = f"evidence-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    keys = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    data = {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s3"}, "data": data})
    team = {"metadata": {"name": "team"}, "data": {"team.asc": gpg_keyring.public_key}}
    core.create_namespaced_config_map(namespace, team)
    settings = {
        "capture": True,
        "destination": {"bucket": bucket, "endpoint": s3_server.endpoint, "credentialsSecretRef": {"name": "s3"}},
        "encryption": {"gpg": {"recipientsConfigMapRef": {"name": "team", "key": "team.asc"}}},
    }
    body = {
        "metadata": {"namespace": namespace, "name": "breach", "uid": str(uuid.uuid4())},
        "spec": {"incidentId": "INC-300", "reason": "verbose namespace", "severity": "P1"},
    }
    # The image's environment, and no malloc setting of this test's own environment that the image does not set.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))} | image_env()
    started = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps([body, settings, str(kubeconfig)]),
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.splitlines()[-1])
    baseline, peak = result["baseline_kib"] / 1024, result["peak_kib"] / 1024
    took = time.monotonic() - started
    print(
        f"\ncapture of {PODS * LOG_BYTES / MIB:.0f} MiB of logs in {took:.0f} s: "
        f"RSS {baseline:.0f} MiB before, peak {peak:.0f} MiB"
    )

    manifest = json.loads(
        s3_server.client().get_object(Bucket=bucket, Key=result["record"]["manifest_key"])["Body"].read()
    )
    logs = {f["name"]: f for f in manifest["files"] if f["name"].startswith("logs/") and "previous" not in f["name"]}
    assert manifest["logErrors"] == {} and len(logs) == PODS
    assert {(f["size"], f["sha256"]) for f in logs.values()} == {(LOG_BYTES, log_node[1])}  # every byte served
    assert sum(f["size"] for f in logs.values()) == 300 * MIB
    assert manifest["archive"]["size"] > 300 * MIB  # encrypted without compression
    assert peak < RSS_LIMIT_MIB, f"peak RSS {peak:.0f} MiB (baseline {baseline:.0f} MiB)"
