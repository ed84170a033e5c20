"""How fast an EmergencyIsolation contains a namespace.

Measures, over N runs in the runbook's namespace (its Deployments and StatefulSets), the time from creating
an EmergencyIsolation to the emergency-isolate NetworkPolicy being visible to a watch, and as the baseline,
in the same run and interleaved, the time from creating that same NetworkPolicy directly through the API to
the watch seeing it. The operator runs as its own process, as its Deployment runs it.

    .venv/bin/python bench/isolation_latency.py [--kubeconfig PATH] [--runs 30]

Without --kubeconfig (or $RUNBOOK_BENCH_KUBECONFIG) a local control plane is started for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "tools" / "localcluster"))

from runbook_operator.builders.isolation import POLICY_NAME  # noqa: E402
from runbook_operator.models import GROUP, VERSION  # noqa: E402

PLURAL = "emergencyisolations"
DENY_ALL = {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


@contextlib.contextmanager
def cluster_kubeconfig(given: str | None) -> Iterator[Path]:
    if given:
        yield Path(given)
        return
    import localcluster

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as state, localcluster.LocalCluster(state) as cluster:
        yield cluster.kubeconfig


def install_crds(api: kubernetes.client.ApiClient) -> None:
    extensions = kubernetes.client.ApiextensionsV1Api(api)
    for path in sorted((ROOT / "crds").glob("runbook.dev_*.yaml")):
        doc = yaml.safe_load(path.read_text())
        try:
            extensions.create_custom_resource_definition(doc)
        except kubernetes.client.ApiException as error:
            if error.status != 409:
                raise
            current = extensions.read_custom_resource_definition(doc["metadata"]["name"])
            doc["metadata"]["resourceVersion"] = current.metadata.resource_version
            extensions.replace_custom_resource_definition(doc["metadata"]["name"], doc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crd = extensions.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
            return
        time.sleep(0.2)
    raise TimeoutError("the EmergencyIsolation CRD is not Established")


class PolicyWatch:
    """A watch on the namespace's NetworkPolicies; each event with its arrival time."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.events: queue.Queue[tuple[str, str, float]] = queue.Queue()
        self.net = kubernetes.client.NetworkingV1Api(api)
        self.namespace = namespace
        self.watch = kubernetes.watch.Watch()
        version = self.net.list_namespaced_network_policy(namespace).metadata.resource_version
        threading.Thread(target=self._run, args=(version,), daemon=True).start()

    def _run(self, version: str) -> None:
        for event in self.watch.stream(
            self.net.list_namespaced_network_policy, self.namespace, resource_version=version, timeout_seconds=3600
        ):
            self.events.put((event["type"], event["object"].metadata.name, time.monotonic()))

    def wait(self, kind: str, name: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while True:
            event_type, event_name, seen = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if (event_type, event_name) == (kind, name):
                return seen


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", default=os.environ.get("RUNBOOK_BENCH_KUBECONFIG"))
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    with cluster_kubeconfig(args.kubeconfig) as kubeconfig:
        api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        core, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
        custom, net = kubernetes.client.CustomObjectsApi(api), kubernetes.client.NetworkingV1Api(api)
        install_crds(api)
        namespace = f"bench-isolation-{uuid.uuid4().hex[:6]}"
        core.create_namespace({"metadata": {"name": namespace}})
        for doc in yaml.safe_load_all((ROOT / "deploy/dev/workloads.yaml").read_text()):
            create = (
                apps.create_namespaced_deployment
                if doc["kind"] == "Deployment"
                else apps.create_namespaced_stateful_set
            )
            create(namespace, doc)
        log = Path(tempfile.mkstemp(prefix="bench-operator-", suffix=".log")[1])
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "RUNBOOK_METRICS_PORT": "0"}
        command = [sys.executable, "-m", "runbook_operator.cli", "run", "--namespace", namespace, "--health-port", "0"]
        with log.open("wb") as out:
            operator = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        watch = PolicyWatch(api, namespace)

        def isolation_run(index: int) -> float:
            name = f"bench-{index}"
            body: dict[str, Any] = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "EmergencyIsolation",
                "metadata": {"name": name},
                "spec": {"reason": "latency benchmark", "incidentId": f"BENCH-{index}", "evidence": {"capture": False}},
            }
            start = time.monotonic()
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
            seen = watch.wait("ADDED", POLICY_NAME)
            # Let it finish (scale to zero), then release by deletion and wait until the policy is gone.
            deadline = time.monotonic() + 60
            while (
                custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                .get("status", {})
                .get("phase")
                != "Isolated"
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not reach Isolated; operator log: {log}")
                time.sleep(0.05)
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            watch.wait("DELETED", POLICY_NAME)
            return seen - start

        def direct_run() -> float:
            start = time.monotonic()
            net.create_namespaced_network_policy(namespace, {"metadata": {"name": POLICY_NAME}, "spec": DENY_ALL})
            seen = watch.wait("ADDED", POLICY_NAME)
            net.delete_namespaced_network_policy(POLICY_NAME, namespace)
            watch.wait("DELETED", POLICY_NAME)
            return seen - start

        try:
            isolation_run(-1)  # warm-up: the operator has connected and listed
            operator_times, direct_times = [], []
            for index in range(args.runs):
                direct_times.append(direct_run())
                operator_times.append(isolation_run(index))
                time.sleep(0.2)  # let the release settle (kopf's batching of the deletion's events)
        finally:
            operator.terminate()
            operator.wait(30)
            core.delete_namespace(namespace)

    print(f"EmergencyIsolation latency, {args.runs} runs (creation -> NetworkPolicy visible to a watch)")
    print(f"{'':28}{'p50':>10}{'p95':>10}{'max':>10}{'mean':>10}")
    rows = (("operator (CR -> policy)", operator_times), ("baseline (policy directly)", direct_times))
    for label, values in rows:
        cells = [statistics.median(values), percentile(values, 0.95), max(values), statistics.mean(values)]
        print(f"{label:28}" + "".join(f"{v * 1000:>8.0f}ms" for v in cells))
    p50 = statistics.median(operator_times) / statistics.median(direct_times)
    p95 = percentile(operator_times, 0.95) / percentile(direct_times, 0.95)
    print(f"ratio operator/baseline: p50 {p50:.1f}x, p95 {p95:.1f}x")
    target = percentile(operator_times, 0.95) < 1.0
    print(f"target p95 < 1 s: {'met' if target else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
