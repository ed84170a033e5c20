"""Whether SecretRotations waiting on slow rollouts delay a ScalingProfile's window edge.

A ScalingProfile's window (cron ``* * * * *``, a duration of some seconds) opens every minute and closes a
few seconds later; each edge changes the owned HPA's minReplicas (2 -> 4 -> 2). Measured: how late after
each edge the HPA's new minReplicas is visible to a watch, first with nothing else to do (the baseline, in
the same run), then while 20 SecretRotations are waiting for restart targets that never become ready (a
nodeSelector no node matches; rolloutTimeout 1h), each re-checking its rollout every few seconds. The operator
runs as its own process, as its Deployment runs it.

    .venv/bin/python bench/rotation_vs_scaling.py [--kubeconfig PATH] [--rotations 20] [--minutes 2]

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
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes

from isolation_latency import cluster_kubeconfig, install_crds
from runbook_operator.models import GROUP, VERSION
from scaling_transition_latency import HpaWatch

LEAD = 6.0  # at least this many seconds between creating the profile and its first edge
WINDOW_MIN, AUTOSCALING_MIN = 4, 2
MISSED = 30.0  # an edge whose HPA change is not seen this long after it counts as missed


def deployment(name: str, *, schedulable: bool) -> dict[str, Any]:
    labels = {"app": name}
    pod: dict[str, Any] = {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
    if not schedulable:
        pod["nodeSelector"] = {"runbook.dev/no-such-node": "true"}
    return {
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def edges(start_minute: float, duration: int, after: float, count: int) -> list[tuple[float, int]]:
    """The window's next ``count`` edges after ``after``: (instant, minReplicas from then on)."""
    found: list[tuple[float, int]] = []
    minute = start_minute
    while len(found) < count:
        for instant, replicas in ((minute, WINDOW_MIN), (minute + duration, AUTOSCALING_MIN)):
            if instant > after and len(found) < count:
                found.append((instant, replicas))
        minute += 60
    return found


def measure(watch: HpaWatch, name: str, planned: list[tuple[float, int]]) -> list[float]:
    """Lateness of each planned edge: when the watch saw minReplicas change, minus the edge."""
    while not watch.events.empty():  # what was seen before the first planned edge
        watch.events.get_nowait()
    late = []
    for instant, replicas in planned:
        at = f"  edge {datetime.fromtimestamp(instant, UTC):%H:%M:%S} -> min {replicas}"
        try:
            seen = watch.wait(name, replicas, timeout=instant - time.time() + MISSED)
        except queue.Empty:
            late.append(math.inf)
            print(f"{at}: not seen within {MISSED:.0f} s")
            continue
        late.append(seen - instant)
        print(f"{at}: {late[-1] * 1000:.0f} ms")
    return late


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", default=os.environ.get("RUNBOOK_BENCH_KUBECONFIG"))
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--minutes", type=int, default=2, help="minutes of window edges per phase (2 edges each)")
    args = parser.parse_args()

    with cluster_kubeconfig(args.kubeconfig) as kubeconfig:
        api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        core, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
        custom = kubernetes.client.CustomObjectsApi(api)
        install_crds(api)
        namespace = f"bench-rotscale-{uuid.uuid4().hex[:6]}"
        core.create_namespace({"metadata": {"name": namespace}})
        apps.create_namespaced_deployment(namespace, deployment("api", schedulable=True))
        log = Path(tempfile.mkstemp(prefix="bench-operator-", suffix=".log")[1])
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "RUNBOOK_METRICS_PORT": "0"}
        command = [sys.executable, "-m", "runbook_operator.cli", "run", "--namespace", namespace, "--health-port", "0"]
        with log.open("wb") as out:
            operator = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        watch = HpaWatch(api, namespace)
        try:
            # The window closes LEAD seconds from now at the earliest (a new minute when too late in this one).
            now = time.time()
            minute = math.floor(now / 60) * 60
            duration = math.ceil(now - minute + LEAD)
            if duration > 45:
                time.sleep(minute + 60 - now + 0.5)
                now, minute = time.time(), minute + 60
                duration = math.ceil(now - minute + LEAD)
            window = {
                "name": "bench",
                "start": "* * * * *",
                "duration": f"{duration}s",
                "minReplicas": WINDOW_MIN,
                "maxReplicas": 10,
            }
            profile = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ScalingProfile",
                "metadata": {"name": "api"},
                "spec": {
                    "targetRef": {"name": "api"},
                    "autoscaling": {"minReplicas": AUTOSCALING_MIN, "maxReplicas": 10},
                    "windows": [window],
                },
            }
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "scalingprofiles", profile)
            watch.wait("api", WINDOW_MIN)  # the operator is up, the window open, the HPA created
            count = 2 * args.minutes
            print(f"baseline: the window's edges with nothing else to do ({duration} s open each minute)")
            baseline_edges = edges(minute, duration, time.time(), count)
            baseline = measure(watch, "api", baseline_edges)

            for index in range(args.rotations):
                name = f"stuck-{index}"
                apps.create_namespaced_deployment(namespace, deployment(name, schedulable=False))
                secret = {"metadata": {"name": f"token-{index}"}, "stringData": {"token": "initial-token-value"}}
                core.create_namespaced_secret(namespace, secret)
                rotation = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "SecretRotation",
                    "metadata": {"name": f"token-{index}"},
                    "spec": {
                        "secretRef": {"name": f"token-{index}", "key": "token"},
                        "restartTargets": [{"kind": "Deployment", "name": name}],
                        "rolloutTimeout": "1h",
                        "rotateNow": "1",
                    },
                }
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "secretrotations", rotation)

            def waiting() -> int:
                items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "secretrotations")["items"]
                return sum((item.get("status") or {}).get("step") == "Published" for item in items)

            deadline = time.monotonic() + 120
            while waiting() < args.rotations and time.monotonic() < deadline:
                time.sleep(0.5)
            print(f"with {waiting()} of {args.rotations} SecretRotations waiting on rollouts that never finish")
            loaded = measure(watch, "api", edges(minute, duration, time.time() + 1, count))
            still = waiting()
        finally:
            operator.terminate()
            operator.wait(30)
            core.delete_namespace(namespace)

    print()
    print(f"ScalingProfile window edge -> new HPA minReplicas visible to a watch ({count} edges each)")
    print(f"{'':44}{'p50':>9}{'max':>9}{'mean':>9}")
    rows = ((f"with {args.rotations} rotations waiting on rollouts", loaded), ("baseline (no rotations)", baseline))
    for label, values in rows:
        cells = [statistics.median(values), max(values), statistics.mean(values)]
        print(f"{label:44}" + "".join(f"{v * 1000:>7.0f}ms" for v in cells))
    print(f"rotations still waiting at the end: {still} of {args.rotations}")
    print(f"target: every edge < 1 s late with the rotations: {'met' if max(loaded) < 1.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
