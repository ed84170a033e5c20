"""ScalingProfile decisions, one pass at a time: an in-memory API (FakeApi) and a chosen ``now``, no server.

Window edges and override expiry change the HPA's bounds exactly at the edge and the pass requeues at the next
edge; an isolated namespace pauses the profile; a resync at the same state writes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from runbook_operator.clients import kube
from runbook_operator.reconcilers import runtime, scaling
from runbook_operator.reconcilers.runtime import Context, Result
from tests.fake_api import FakeApi

NS = "team-a"
BURST = {"name": "burst", "start": "0 8 * * *", "duration": "1h", "minReplicas": 4, "maxReplicas": 8}
AUTOSCALING = {"minReplicas": 2, "maxReplicas": 10, "cpuUtilization": 70, "memoryUtilization": 80}
ORIGINAL = {"requests": {"cpu": "100m"}, "limits": {"cpu": "500m"}}


def at(hour: int, minute: int = 0, second: int = 0, microsecond: int = 0) -> datetime:
    return datetime(2026, 3, 2, hour, minute, second, microsecond, tzinfo=UTC)


def cluster(**spec: Any) -> FakeApi:
    api = FakeApi()
    containers = [{"name": "api", "image": "api:1", "resources": ORIGINAL}, {"name": "sidecar", "image": "s:1"}]
    workload = {"metadata": {"name": "api"}, "spec": {"template": {"spec": {"containers": containers}}}}
    api.put(kube.DEPLOYMENTS, NS, workload)
    api.put(
        scaling.PROFILES,
        NS,
        {"metadata": {"name": "api"}, "spec": {"targetRef": {"kind": "Deployment", "name": "api"}, **spec}},
    )
    return api


def run(api: FakeApi, now: datetime, *, isolated_by: str | None = None) -> Result:
    """One pass over the profile as stored, at ``now``, with the namespace held by ``isolated_by``."""
    body = api.stored(scaling.PROFILES, NS, "api")
    assert body is not None
    ctx = Context.of(scaling.PROFILE, body, api, isolation=lambda namespace: isolated_by, now=lambda: now)
    return runtime.run_pass(ctx, scaling.PROFILE.reconcile)


def hpa_bounds(api: FakeApi) -> tuple[int, int]:
    hpa = api.stored(kube.HPAS, NS, "api")
    assert hpa is not None
    return hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]


def status(api: FakeApi) -> dict[str, Any]:
    body = api.stored(scaling.PROFILES, NS, "api")
    assert body is not None
    found: dict[str, Any] = body["status"]
    return found


def events(api: FakeApi) -> list[str]:
    return [c.body["reason"] for c in api.writes() if c.verb == "create" and c.plural == "events"]


def condition(api: FakeApi, type_: str) -> tuple[str, str]:
    found = next(c for c in status(api)["conditions"] if c["type"] == type_)
    return found["status"], found["reason"]


def test_a_window_changes_the_bounds_exactly_at_its_edges_and_requeues_at_the_next() -> None:
    api = cluster(autoscaling=AUTOSCALING, windows=[BURST])

    assert run(api, at(7, 59)) == Result.after(60)
    assert hpa_bounds(api) == (2, 10)
    assert "activeWindow" not in status(api) and status(api)["nextTransition"] == "2026-03-02T08:00:00Z"

    just_before = at(7, 59, 59, 999_000)
    assert run(api, just_before) == Result.after(0.001)
    assert hpa_bounds(api) == (2, 10)

    api.calls.clear()
    assert run(api, at(8)) == Result.after(3600)  # open until 09:00
    assert hpa_bounds(api) == (4, 8)
    assert (status(api)["activeWindow"], status(api)["minReplicas"], status(api)["maxReplicas"]) == ("burst", 4, 8)
    assert status(api)["nextTransition"] == "2026-03-02T09:00:00Z"
    assert events(api) == ["HPAUpdated", "WindowOpened"]

    api.calls.clear()
    assert run(api, at(9)) == Result.after(timedelta(hours=23).total_seconds())  # opens again tomorrow at 08:00
    assert hpa_bounds(api) == (2, 10)
    assert "activeWindow" not in status(api) and status(api)["nextTransition"] == "2026-03-03T08:00:00Z"
    assert events(api) == ["HPAUpdated", "WindowClosed"]
    assert status(api)["phase"] == "Active" and condition(api, "Ready") == ("True", "Reconciled")


def test_an_override_pins_the_bounds_until_it_expires() -> None:
    until = at(12, 30)
    override = {"replicas": 5, "until": "2026-03-02T12:30:00Z", "reason": "launch"}
    api = cluster(autoscaling=AUTOSCALING, windows=[BURST], override=override)

    assert run(api, until - timedelta(seconds=30)) == Result.after(30)
    assert hpa_bounds(api) == (5, 5)
    assert status(api)["overrideUntil"] == status(api)["nextTransition"] == "2026-03-02T12:30:00Z"
    assert "OverrideStarted" in events(api)

    api.calls.clear()
    assert run(api, until) == Result.after(timedelta(hours=19, minutes=30).total_seconds())  # the window's start
    assert hpa_bounds(api) == (2, 10)
    assert "overrideUntil" not in status(api)
    assert (status(api)["minReplicas"], status(api)["maxReplicas"]) == (2, 10)
    assert events(api) == ["HPAUpdated", "OverrideExpired"]


def test_paused_while_the_namespace_is_isolated_and_resumed_after() -> None:
    api = cluster(autoscaling=AUTOSCALING)
    run(api, at(10))
    assert hpa_bounds(api) == (2, 10)

    api.calls.clear()
    assert run(api, at(10, 1), isolated_by="breach") == Result.done()  # the isolation's release wakes it
    assert status(api)["phase"] == "Paused"
    assert condition(api, "Paused") == ("True", "IsolationActive")
    assert condition(api, "Ready") == ("False", "Paused")
    assert "EmergencyIsolation breach" in next(c for c in status(api)["conditions"] if c["type"] == "Paused")["message"]
    assert events(api) == ["Paused"]
    assert {c.plural for c in api.writes()} == {"scalingprofiles", "events"}  # the workload and HPA left alone

    # a change while paused is not applied, and a second paused pass posts no second Event
    api.patch(scaling.PROFILES, NS, "api", {"spec": {"autoscaling": {**AUTOSCALING, "minReplicas": 3}}})
    api.calls.clear()
    run(api, at(10, 2), isolated_by="breach")
    assert hpa_bounds(api) == (2, 10) and events(api) == []
    assert status(api)["observedGeneration"] == 2

    api.calls.clear()
    assert run(api, at(10, 3)) == Result.done()  # no window, no override: nothing scheduled
    assert hpa_bounds(api) == (3, 10)
    assert status(api)["phase"] == "Active"
    assert condition(api, "Paused") == ("False", "NotPaused")
    assert events(api) == ["Resumed", "HPAUpdated"]


def test_a_resync_at_the_same_state_writes_nothing() -> None:
    resources = [{"container": "api", "requests": {"cpu": "500m"}, "limits": {"cpu": "2"}}]
    api = cluster(autoscaling=AUTOSCALING, windows=[BURST], resources=resources)
    run(api, at(8, 30))
    assert hpa_bounds(api) == (4, 8)
    assert status(api)["originalResources"] == [{"container": "api", **ORIGINAL}]
    assert {c.plural for c in api.writes()} >= {"deployments", "horizontalpodautoscalers", "scalingprofiles"}

    api.calls.clear()
    assert run(api, at(8, 45)) == Result.after(15 * 60)
    assert api.writes() == []
    assert api.calls  # it did read: the pass ran


def test_a_missing_target_is_retried_and_a_foreign_hpa_is_a_conflict() -> None:
    api = FakeApi()
    api.put(
        scaling.PROFILES,
        NS,
        {"metadata": {"name": "api"}, "spec": {"targetRef": {"kind": "Deployment", "name": "api"}, "autoscaling": {}}},
    )
    result = run(api, at(10))
    assert result.error is not None and result.error.reason == "TargetNotFound"
    assert result.requeue_after == scaling.TARGET_RETRY
    assert condition(api, "Ready") == ("False", "TargetNotFound")

    api = cluster(autoscaling=AUTOSCALING)
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"}
    api.put(kube.HPAS, NS, {"metadata": {"name": "by-hand"}, "spec": {"scaleTargetRef": target, "maxReplicas": 3}})
    result = run(api, at(10))
    assert result.error is not None and result.error.reason == "HPAConflict"
    assert condition(api, "Conflict") == ("True", "HPAConflict")
    assert api.stored(kube.HPAS, NS, "api") is None
