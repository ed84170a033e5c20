"""A stuck S3 endpoint (it accepts connections and never answers) costs the operator a bounded time per pass and
never the containment path: with every worker of the shared pool inside a call to it, an EmergencyIsolation in
another namespace is contained in its normal time, and each stuck policy reports Ready=False S3Timeout naming
spec.destination.s3.endpoint within its worst case."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import kopf.testing
import kubernetes
import pytest
from tests.integration.conftest import OPERATOR_ARGS, enabled_namespace, grant
from tests.integration.test_lifecycle import create_policy, policy_spec, ready, references
from tests.services import S3Server
from tests.silent import SilentEndpoint

from runbook_operator.clients import s3
from runbook_operator.reconcilers.runtime import EXECUTOR

pytestmark = pytest.mark.integration

WORKERS = EXECUTOR._max_workers
STUCK = WORKERS + 4  # more passes than workers: the pool is full and some wait for a second round
CONTAINED_WITHIN = 8.0  # seconds, create -> deny-all policy; one queued behind the stuck passes waits >= 10 s


@pytest.fixture
def other_namespaces(api: kubernetes.client.ApiClient) -> Iterator[list[str]]:
    """Two more enabled namespaces (as the ``namespace`` fixture makes one), for EmergencyIsolations."""
    with enabled_namespace(api) as first, enabled_namespace(api) as second:
        yield [first, second]


def contain(api: kubernetes.client.ApiClient, namespace: str, wait_for: Callable[..., Any]) -> float:
    """Seconds from an EmergencyIsolation's creation to its deny-all policy."""
    created = time.monotonic()
    isolate(api, namespace)
    wait_for(lambda: deny_all_present(api, namespace), timeout=60, what=f"the deny-all policy in {namespace}")
    return time.monotonic() - created


def isolate(api: kubernetes.client.ApiClient, namespace: str) -> None:
    body = {
        "apiVersion": "runbook.dev/v1alpha1",
        "kind": "EmergencyIsolation",
        "metadata": {"name": "breach"},
        "spec": {
            "reason": "Suspected exfiltration through the api service",
            "incidentId": "INC-2026-0099",
            "severity": "P1",
            "network": {"isolate": True},
            "evidence": {"capture": False},
        },
    }
    kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
        "runbook.dev", "v1alpha1", namespace, "emergencyisolations", body
    )


def deny_all_present(api: kubernetes.client.ApiClient, namespace: str) -> bool:
    names = [
        p.metadata.name for p in kubernetes.client.NetworkingV1Api(api).list_namespaced_network_policy(namespace).items
    ]
    return "emergency-isolate" in names


def test_a_silent_s3_endpoint_times_out_and_containment_elsewhere_is_not_queued(
    api: kubernetes.client.ApiClient,
    namespace: str,
    other_namespaces: list[str],
    crds_installed: list[str],
    s3_server: S3Server,
    wait_for: Callable[..., Any],
) -> None:
    limits = s3.OPERATOR_TIMEOUTS
    idle_namespace, loaded_namespace = other_namespaces
    with SilentEndpoint() as silent:
        references(api, namespace, s3_server)
        grant(api, namespace, endpoints=[silent.endpoint])  # the test's own S3 endpoint
        args = [*OPERATOR_ARGS, "--namespace", namespace, "--namespace", idle_namespace]
        with kopf.testing.KopfRunner([*args, "--namespace", loaded_namespace], timeout=180) as runner:
            normal = contain(api, idle_namespace, wait_for)  # the normal time, with nothing else going on

            names = [f"stuck-{n}" for n in range(STUCK)]
            started = time.monotonic()
            for name in names:
                create_policy(api, namespace, name, policy_spec(silent.endpoint, "stuck-bucket", name))
            # Every worker inside a call the endpoint never answers (first attempts, all before any times out).
            wait_for(lambda: silent.connections >= WORKERS, timeout=limits.read, what="every worker stuck in S3")
            assert time.monotonic() - started < limits.read  # still inside their first attempts

            loaded = contain(api, loaded_namespace, wait_for)
            overlapped = time.monotonic() - started < limits.read  # the stuck calls still outstanding meanwhile

            # Each stuck pass ends within its worst case; the passes beyond the pool's size wait for one round.
            deadline = 2 * limits.worst_case + 30
            wait_for(
                lambda: all(ready(api, namespace, name).get("reason") == "S3Timeout" for name in names),
                timeout=deadline,
                what="every stuck policy Ready=False S3Timeout",
            )
            took = time.monotonic() - started
        assert runner.exception is None

    print(f"containment: {normal:.2f} s idle, {loaded:.2f} s with {WORKERS} workers stuck; timeouts after {took:.0f} s")
    assert overlapped
    assert loaded < CONTAINED_WITHIN, f"containment took {loaded:.1f} s with the pool full ({normal:.1f} s idle)"
    condition = ready(api, namespace, names[0])
    assert condition["status"] == "False"
    assert condition["message"] == (
        f"spec.destination.s3.endpoint: no answer from {silent.endpoint} within {limits.read:g} s "
        f"({limits.attempts} attempts)"
    )
    assert took < deadline
    # Bounded retries: each pass made at most `attempts` connections (passes retried after 60 s not yet due).
    assert silent.connections <= STUCK * limits.attempts
