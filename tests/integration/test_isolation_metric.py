"""runbook_isolation_time_to_contain_seconds on a real API server: the containment the operator does in tens
of milliseconds is not reported as up to a second (creationTimestamp has whole seconds)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import kopf.testing
import kubernetes
import pytest
from prometheus_client import REGISTRY

import runbook_operator.main

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "runbook.dev", "v1alpha1", "emergencyisolations"
METRIC = "runbook_isolation_time_to_contain_seconds"


@pytest.fixture(autouse=True, params=["containment watch", "kopf's event"])
def _path(request: pytest.FixtureRequest, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths of a first containment: the containment watch of the namespace (as cli.py starts it), and
    kopf's event alone (no scope known: no watch)."""
    monkeypatch.setattr(runbook_operator.main, "SCOPE", [namespace] if request.param == "containment watch" else None)


def test_time_to_contain_is_not_rounded_up_to_the_creation_second(
    api: kubernetes.client.ApiClient,
    crds_installed: list[str],
    namespace: str,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    custom = kubernetes.client.CustomObjectsApi(api)
    networking = kubernetes.client.NetworkingV1Api(api)

    def isolation(name: str, **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "EmergencyIsolation",
            "metadata": {"name": name},
            "spec": {
                "reason": "time-to-contain check",
                "incidentId": "INC-1",
                "network": {"isolate": True},
                "scaleToZero": {"enabled": False},
                "evidence": {"capture": False},
                **spec,
            },
        }

    def phase(name: str) -> str | None:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        value: str | None = (obj.get("status") or {}).get("phase")
        return value

    # The operator is watching (a just-started API server answers 429 for a moment): a released one first.
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, isolation("warm-up", released=True))
    wait_for(lambda: phase("warm-up") == "Released", timeout=60, what="the warm-up isolation released")
    count = REGISTRY.get_sample_value(f"{METRIC}_count") or 0.0
    total = REGISTRY.get_sample_value(f"{METRIC}_sum") or 0.0
    # Created 0.6 s into a second: measured from the whole-second creationTimestamp it would read >= 0.6 s.
    time.sleep((0.6 - time.time() % 1) % 1)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, isolation("breach"))
    created = time.time()
    wait_for(
        lambda: networking.list_namespaced_network_policy(namespace).items, timeout=30, interval=0.01, what="policy"
    )
    seen_by_watch = time.time() - created  # an upper bound for what the operator may report
    wait_for(lambda: (REGISTRY.get_sample_value(f"{METRIC}_count") or 0.0) > count, timeout=10, what="the metric")
    observed = (REGISTRY.get_sample_value(f"{METRIC}_sum") or 0.0) - total
    print(f"time to contain: reported {observed:.3f} s; the test saw the policy {seen_by_watch:.3f} s after creating")
    assert 0 < observed < min(0.3, seen_by_watch + 0.05)

    for name in ("breach", "warm-up"):
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def gone() -> bool:
        return not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]

    wait_for(gone, timeout=30, what="the release on deletion")
