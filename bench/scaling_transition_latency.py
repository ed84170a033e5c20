"""How punctually a ScalingProfile applies a transition (its clock sleeps until the edge; it never polls).

Measures, over N runs, how late after an override's ``until`` the owned HPA's new bounds are visible to a
watch (the operator's daemon wakes at the instant, reads the profile, checks the interlock, the workload and
the HPAs, and applies the HPA), and as the baseline, in the same run and interleaved, an ideal controller: a
timer in this process that wakes at the same kind of instant and patches an HPA directly. The operator runs
as its own process, as its Deployment runs it.

    .venv/bin/python bench/scaling_transition_latency.py [--kubeconfig PATH] [--runs 15]

Without --kubeconfig (or $RUNBOOK_BENCH_KUBECONFIG) a local control plane is started for the run.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import urllib3

from isolation_latency import cluster_kubeconfig, install_crds, percentile
from runbook_operator.models import GROUP, VERSION

PLURAL = "scalingprofiles"
LEAD = 2.0  # seconds between setting a transition and its instant


class HpaWatch:
    """A watch on the namespace's HPAs: (name, minReplicas, wall-clock arrival) for each event."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.events: queue.Queue[tuple[str, int, float]] = queue.Queue()
        self.hpas = kubernetes.client.AutoscalingV2Api(api)
        self.namespace = namespace
        version = self.hpas.list_namespaced_horizontal_pod_autoscaler(namespace).metadata.resource_version
        threading.Thread(target=self._run, args=(version,), daemon=True).start()

    def _run(self, version: str) -> None:
        stream = kubernetes.watch.Watch().stream(
            self.hpas.list_namespaced_horizontal_pod_autoscaler,
            self.namespace,
            resource_version=version,
            timeout_seconds=3600,
        )
        try:
            for event in stream:
                hpa = event["object"]
                self.events.put((hpa.metadata.name, hpa.spec.min_replicas, time.time()))
        except urllib3.exceptions.ProtocolError:
            return  # the bench's cluster stopped under the watch: the measurements are over

    def wait(self, name: str, min_replicas: int, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while True:
            seen_name, seen_min, seen = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if (seen_name, seen_min) == (name, min_replicas):
                return seen


def next_instant() -> float:
    """A whole second at least LEAD seconds ahead (RFC 3339 in the API has second precision)."""
    return float(math.ceil(time.time() + LEAD))


def rfc3339(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", default=os.environ.get("RUNBOOK_BENCH_KUBECONFIG"))
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    with cluster_kubeconfig(args.kubeconfig) as kubeconfig:
        api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        core, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
        custom, hpas = kubernetes.client.CustomObjectsApi(api), kubernetes.client.AutoscalingV2Api(api)
        install_crds(api)
        namespace = f"bench-scaling-{uuid.uuid4().hex[:6]}"
        core.create_namespace({"metadata": {"name": namespace}})
        labels = {"app": "api"}
        apps.create_namespaced_deployment(
            namespace,
            {
                "metadata": {"name": "api"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "api", "image": "registry.invalid/api:1"}]},
                    },
                },
            },
        )
        # The baseline's HPA scales a second workload (one HPA per workload).
        hpas.create_namespaced_horizontal_pod_autoscaler(
            namespace,
            {
                "metadata": {"name": "direct"},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "other"},
                    "minReplicas": 2,
                    "maxReplicas": 10,
                },
            },
        )
        log = Path(tempfile.mkstemp(prefix="bench-operator-", suffix=".log")[1])
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "RUNBOOK_METRICS_PORT": "0"}
        command = [sys.executable, "-m", "runbook_operator.cli", "run", "--namespace", namespace, "--health-port", "0"]
        with log.open("wb") as out:
            operator = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        watch = HpaWatch(api, namespace)
        profile: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ScalingProfile",
            "metadata": {"name": "api"},
            "spec": {"targetRef": {"name": "api"}, "autoscaling": {"minReplicas": 2, "maxReplicas": 10}},
        }

        def operator_run(index: int) -> float:
            """Pin to 5 until an instant; the lateness of the HPA going back to 2 after it."""
            replicas = 5 + index % 2  # differs from the previous run, so each start is an update
            until = next_instant()
            override = {"replicas": replicas, "until": rfc3339(until), "reason": "benchmark"}
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "api", {"spec": {"override": override}}
            )
            watch.wait("api", replicas)
            return watch.wait("api", 2) - until

        def direct_run(index: int) -> float:
            """An ideal timer in this process: sleep until the instant, then patch the HPA."""
            until = next_instant()
            time.sleep(max(0.0, until - time.time()))
            hpas.patch_namespaced_horizontal_pod_autoscaler(
                "direct", namespace, {"spec": {"minReplicas": 3 + index % 2}}
            )
            return watch.wait("direct", 3 + index % 2) - until

        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, profile)
            watch.wait("api", 2)  # the operator is up and created its HPA
            operator_times, direct_times = [], []
            for index in range(args.runs):
                direct_times.append(direct_run(index))
                operator_times.append(operator_run(index))
        finally:
            operator.terminate()
            operator.wait(30)
            core.delete_namespace(namespace)

    print(f"ScalingProfile transition lateness, {args.runs} runs (instant -> new HPA bounds visible to a watch)")
    print(f"{'':30}{'p50':>10}{'p95':>10}{'max':>10}{'mean':>10}")
    rows = (("operator (override expiry)", operator_times), ("baseline (ideal timer+patch)", direct_times))
    for label, values in rows:
        cells = [statistics.median(values), percentile(values, 0.95), max(values), statistics.mean(values)]
        print(f"{label:30}" + "".join(f"{v * 1000:>8.0f}ms" for v in cells))
    extra = statistics.median(operator_times) - statistics.median(direct_times)
    print(f"operator minus baseline, p50: {extra * 1000:.0f}ms")
    target = percentile(operator_times, 0.95) < 1.0
    print(f"target p95 < 1 s after the instant: {'met' if target else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
