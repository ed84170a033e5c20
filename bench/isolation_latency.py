"""How fast an EmergencyIsolation contains a namespace.

Measures, over N runs in the runbook's namespace (its Deployments and StatefulSets), the time from creating
an EmergencyIsolation to the emergency-isolate NetworkPolicy being visible to a watch, and as the baseline,
in the same run and interleaved, the time from creating that same NetworkPolicy directly through the API to
the watch seeing it. The operator runs as its own process, as its Deployment runs it.

    .venv/bin/python bench/isolation_latency.py [--kubeconfig PATH] [--runs 30]

``--concurrent N``: N namespaces (each the runbook's workloads), N EmergencyIsolations created at once (from
``--clients`` threads), each timed from its own create call to its policy being visible; the baseline creates
the N policies directly the same way, in the same run, before each round. The operator watches the cluster.

    .venv/bin/python bench/isolation_latency.py --concurrent 100 [--rounds 3] [--clients 16]

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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
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


class ClusterPolicyWatch:
    """A cluster-wide watch on emergency-isolate NetworkPolicies: when each namespace's was last added and
    deleted (arrival times)."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.net = kubernetes.client.NetworkingV1Api(api)
        self.added: dict[str, float] = {}
        self.deleted: dict[str, float] = {}
        self.changed = threading.Condition()
        version = self.net.list_network_policy_for_all_namespaces().metadata.resource_version
        threading.Thread(target=self._run, args=(version,), daemon=True).start()

    def _run(self, version: str) -> None:
        stream = kubernetes.watch.Watch().stream(
            self.net.list_network_policy_for_all_namespaces,
            field_selector=f"metadata.name={POLICY_NAME}",
            resource_version=version,
            timeout_seconds=3600,
        )
        with contextlib.suppress(urllib3.exceptions.ProtocolError):  # the cluster stopped at the end of the run
            self._follow(stream)

    def _follow(self, stream: Iterator[dict[str, Any]]) -> None:
        for event in stream:
            seen, namespace = time.monotonic(), event["object"].metadata.namespace
            with self.changed:
                if event["type"] == "ADDED":
                    self.added[namespace] = seen
                elif event["type"] == "DELETED":
                    self.deleted[namespace] = seen
                self.changed.notify_all()

    def wait(self, what: dict[str, float], namespaces: list[str], after: float, timeout: float = 120) -> None:
        """Until each namespace has an entry in ``what`` (added or deleted) later than ``after``."""
        with self.changed:
            done = self.changed.wait_for(lambda: all(what.get(n, 0.0) > after for n in namespaces), timeout)
        if not done:
            missing = [n for n in namespaces if what.get(n, 0.0) <= after]
            raise TimeoutError(f"{len(missing)} namespaces without the event, e.g. {missing[:3]}")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def create_workloads(apps: kubernetes.client.AppsV1Api, namespace: str) -> None:
    for doc in yaml.safe_load_all((ROOT / "deploy/dev/workloads.yaml").read_text()):
        create = (
            apps.create_namespaced_deployment if doc["kind"] == "Deployment" else apps.create_namespaced_stateful_set
        )
        create(namespace, doc)


def isolation_body(name: str, incident: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "EmergencyIsolation",
        "metadata": {"name": name},
        "spec": {"reason": "latency benchmark", "incidentId": incident, "evidence": {"capture": False}},
    }


def start_operator(kubeconfig: Path, namespaces: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    """The operator as its own process (watching ``namespaces``, or the cluster when empty) and its log."""
    log = Path(tempfile.mkstemp(prefix="bench-operator-", suffix=".log")[1])
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "RUNBOOK_METRICS_PORT": "0"}
    scope = [arg for namespace in namespaces for arg in ("--namespace", namespace)]
    command = [sys.executable, "-m", "runbook_operator.cli", "run", *scope, "--health-port", "0"]
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT), log


def print_table(title: str, rows: tuple[tuple[str, list[float]], ...]) -> None:
    print(title)
    print(f"{'':28}{'p50':>10}{'p95':>10}{'max':>10}{'mean':>10}")
    for label, values in rows:
        cells = [statistics.median(values), percentile(values, 0.95), max(values), statistics.mean(values)]
        print(f"{label:28}" + "".join(f"{v * 1000:>8.0f}ms" for v in cells))
    (_, operator_times), (_, direct_times) = rows
    p50 = statistics.median(operator_times) / statistics.median(direct_times)
    p95 = percentile(operator_times, 0.95) / percentile(direct_times, 0.95)
    print(f"ratio operator/baseline: p50 {p50:.1f}x, p95 {p95:.1f}x")


def concurrent(kubeconfig: Path, count: int, rounds: int, clients: int) -> int:
    """``count`` isolations created at once, ``rounds`` times; the direct creation of as many policies (the
    same threads, the same namespaces) before each round."""
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    api.configuration.connection_pool_maxsize = clients
    core, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    custom, net = kubernetes.client.CustomObjectsApi(api), kubernetes.client.NetworkingV1Api(api)
    install_crds(api)
    run = uuid.uuid4().hex[:6]
    namespaces = [f"bench-iso-{run}-{index}" for index in range(count)]
    pool = ThreadPoolExecutor(max_workers=clients)
    list(pool.map(lambda n: core.create_namespace({"metadata": {"name": n}}), namespaces))
    list(pool.map(lambda n: create_workloads(apps, n), namespaces))
    watch = ClusterPolicyWatch(api)
    operator, log = start_operator(kubeconfig, [])

    def at_once(create: Callable[[str], object]) -> dict[str, float]:
        """Each namespace's ``create`` from the pool's threads; when each call began (monotonic)."""
        begun: dict[str, float] = {}

        def timed(namespace: str) -> None:
            begun[namespace] = time.monotonic()
            create(namespace)

        list(pool.map(timed, namespaces))
        return begun

    def latencies(begun: dict[str, float]) -> list[float]:
        return [watch.added[n] - begun[n] for n in namespaces]

    def phases(name: str) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for item in custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]:
            if item["metadata"]["name"] == name:
                found[item["metadata"]["namespace"]] = (item.get("status") or {}).get("phase")
        return found

    def wait_isolated(name: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while any(phases(name).get(n) != "Isolated" for n in namespaces):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every {name} reached Isolated; operator log: {log}")
            time.sleep(0.5)

    def release(name: str) -> None:
        mark = time.monotonic()
        at_once(lambda n: custom.delete_namespaced_custom_object(GROUP, VERSION, n, PLURAL, name))
        watch.wait(watch.deleted, namespaces, mark, timeout=300)
        deadline = time.monotonic() + 300
        while phases(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not released everywhere; operator log: {log}")
            time.sleep(0.5)

    operator_times: list[float] = []
    direct_times: list[float] = []
    try:
        # warm-up: the operator has connected, listed and handled an isolation in every namespace
        at_once(
            lambda n: custom.create_namespaced_custom_object(GROUP, VERSION, n, PLURAL, isolation_body("warm", "W"))
        )
        wait_isolated("warm")
        release("warm")
        for index in range(rounds):
            mark = time.monotonic()
            begun = at_once(
                lambda n: net.create_namespaced_network_policy(n, {"metadata": {"name": POLICY_NAME}, "spec": DENY_ALL})
            )
            watch.wait(watch.added, namespaces, mark)
            direct_times += latencies(begun)
            mark = time.monotonic()
            at_once(lambda n: net.delete_namespaced_network_policy(POLICY_NAME, n))
            watch.wait(watch.deleted, namespaces, mark)
            time.sleep(1)

            name, body = f"bench-{index}", isolation_body(f"bench-{index}", f"BENCH-{index}")
            mark = time.monotonic()
            begun = at_once(lambda n: custom.create_namespaced_custom_object(GROUP, VERSION, n, PLURAL, body))  # noqa: B023
            watch.wait(watch.added, namespaces, mark)
            operator_times += latencies(begun)
            wait_isolated(name)
            release(name)
            time.sleep(1)
    finally:
        operator.terminate()
        operator.wait(30)
        list(pool.map(core.delete_namespace, namespaces))
        pool.shutdown()

    print_table(
        f"{count} EmergencyIsolations at once, {rounds} rounds, {clients} client threads "
        "(each create call -> its NetworkPolicy visible to a watch)",
        (("operator (CR -> policy)", operator_times), ("baseline (policy directly)", direct_times)),
    )
    target = percentile(operator_times, 0.95) < 0.25
    print(f"target p95 < 250 ms: {'met' if target else 'NOT met'}")
    print(f"operator log: {log}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", default=os.environ.get("RUNBOOK_BENCH_KUBECONFIG"))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--concurrent", type=int, default=0, help="isolations created at once (0: one at a time)")
    parser.add_argument("--rounds", type=int, default=3, help="with --concurrent: how many times")
    parser.add_argument("--clients", type=int, default=16, help="with --concurrent: threads that create")
    args = parser.parse_args()

    if args.concurrent:
        with cluster_kubeconfig(args.kubeconfig) as kubeconfig:
            return concurrent(kubeconfig, args.concurrent, args.rounds, args.clients)

    with cluster_kubeconfig(args.kubeconfig) as kubeconfig:
        api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        core, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
        custom, net = kubernetes.client.CustomObjectsApi(api), kubernetes.client.NetworkingV1Api(api)
        install_crds(api)
        namespace = f"bench-isolation-{uuid.uuid4().hex[:6]}"
        core.create_namespace({"metadata": {"name": namespace}})
        create_workloads(apps, namespace)
        operator, log = start_operator(kubeconfig, [namespace])
        watch = PolicyWatch(api, namespace)

        def isolation_run(index: int) -> float:
            name = f"bench-{index}"
            start = time.monotonic()
            custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, isolation_body(name, f"BENCH-{index}")
            )
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

    print_table(
        f"EmergencyIsolation latency, {args.runs} runs (creation -> NetworkPolicy visible to a watch)",
        (("operator (CR -> policy)", operator_times), ("baseline (policy directly)", direct_times)),
    )
    target = percentile(operator_times, 0.95) < 1.0
    print(f"target p95 < 1 s: {'met' if target else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
