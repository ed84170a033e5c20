"""ScalingProfile on the real API server with the controller manager (Deployment, HPA and garbage-collector
controllers) and the operator running in-process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf.testing
import kubernetes
import pytest
from prometheus_client import REGISTRY

from runbook_operator.models.common import parse_quantity

pytestmark = pytest.mark.integration

WaitFor = Callable[..., Any]
GROUP, VERSION, PLURAL = "runbook.dev", "v1alpha1", "scalingprofiles"
ORIGINAL = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}}
RUNBOOK_RESOURCES = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "2000m", "memory": "1Gi"}}
VPA_CRD = "verticalpodautoscalers.autoscaling.k8s.io"


# ----------------------------------------------------------------------------------------------- helpers


def deployment(name: str, replicas: int = 2) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {"name": "api", "image": "registry.invalid/api:1", "resources": ORIGINAL},
                        {"name": "sidecar", "image": "registry.invalid/sidecar:1"},
                    ]
                },
            },
        },
    }


def profile(name: str = "api", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ScalingProfile",
        "metadata": {"name": name},
        "spec": {"targetRef": {"kind": "Deployment", "name": "api"}, **spec},
    }


RUNBOOK_AUTOSCALING = {"minReplicas": 2, "maxReplicas": 10, "cpuUtilization": 70, "memoryUtilization": 80}


class Cluster:
    """Typed handles and small reads for one test namespace."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, wait_for: WaitFor) -> None:
        self.namespace = namespace
        self.wait_for = wait_for
        self.apps = kubernetes.client.AppsV1Api(api)
        self.hpas = kubernetes.client.AutoscalingV2Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.api = api

    def create_profile(self, body: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )
        return created

    def profile(self, name: str = "api") -> dict[str, Any]:
        body: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return body

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def condition(self, type: str, name: str = "api") -> dict[str, Any] | None:
        conditions = self.profile(name).get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == type), None)

    def wait_condition(self, type: str, status: str, reason: str | None = None, name: str = "api") -> dict[str, Any]:
        def matches() -> dict[str, Any] | None:
            condition = self.condition(type, name)
            if condition and condition["status"] == status and reason in (None, condition["reason"]):
                return condition
            return None

        found: dict[str, Any] = self.wait_for(matches, timeout=60, what=f"{name}: {type}={status} ({reason})")
        return found

    def hpa(self, name: str) -> Any:
        try:
            return self.hpas.read_namespaced_horizontal_pod_autoscaler(name, self.namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def container_resources(self, container: str = "api") -> dict[str, Any]:
        workload = self.apps.read_namespaced_deployment("api", self.namespace)
        found = next(c for c in workload.spec.template.spec.containers if c.name == container)
        plain: dict[str, Any] = self.api.sanitize_for_serialization(found.resources) or {}
        return plain

    def event_reasons(self, name: str = "api") -> list[str]:
        events = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.kind=ScalingProfile,involvedObject.name={name}"
        ).items
        return [e.reason for e in events]

    def event_counts(self, name: str = "api") -> dict[str, int]:
        events = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.kind=ScalingProfile,involvedObject.name={name}"
        ).items
        return {e.reason: e.count or 1 for e in events}

    def wait_event(self, reason: str, name: str = "api") -> None:
        self.wait_for(lambda: reason in self.event_reasons(name), timeout=60, what=f"Event {reason} on {name}")

    def delete_profile(self, name: str = "api") -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

        def gone() -> bool:
            try:
                self.profile(name)
            except kubernetes.client.ApiException as error:
                return error.status == 404
            return False

        self.wait_for(gone, timeout=60, what=f"ScalingProfile {name} to be deleted")


@pytest.fixture
def cluster(api: kubernetes.client.ApiClient, crds_installed: list[str], namespace: str, wait_for: WaitFor) -> Cluster:
    return Cluster(api, namespace, wait_for)


@pytest.fixture
def running(cluster: Cluster, operator_runner: kopf.testing.KopfRunner) -> Cluster:
    """The cluster with the operator watching the test namespace (the runner re-raises its failures)."""
    return cluster


def _with_api(cluster: Cluster) -> Cluster:
    cluster.apps.create_namespaced_deployment(cluster.namespace, deployment("api"))
    return cluster


def _replica_sets(cluster: Cluster) -> list[Any]:
    return list(cluster.apps.list_namespaced_replica_set(cluster.namespace, label_selector="app=api").items)


def _passes() -> float:
    """ScalingProfile passes the in-process operator ran to their end (each one's writes done)."""
    return REGISTRY.get_sample_value("runbook_reconcile_passes_total", {"kind": "ScalingProfile"}) or 0.0


def _same_quantities(actual: dict[str, Any], expected: dict[str, Any]) -> bool:
    return all(
        set(actual.get(section) or {}) == set(values)
        and all(parse_quantity(actual[section][k]) == parse_quantity(v) for k, v in values.items())
        for section, values in expected.items()
    )


# -------------------------------------------------------------------------------------- the happy path


def test_hpa_with_runbook_numbers_resources_roll_and_restore_on_delete(running: Cluster) -> None:
    cluster = _with_api(running)
    cluster.wait_for(lambda: len(_replica_sets(cluster)) == 1, what="the first ReplicaSet")
    created = cluster.create_profile(
        profile(autoscaling=RUNBOOK_AUTOSCALING, resources=[{"container": "api", **RUNBOOK_RESOURCES}])
    )
    cluster.wait_condition("Ready", "True", "Reconciled")

    hpa = cluster.hpa("api")
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (2, 10)
    assert hpa.spec.scale_target_ref.kind == "Deployment" and hpa.spec.scale_target_ref.name == "api"
    targets = {
        m.resource.name: (m.resource.target.type, m.resource.target.average_utilization) for m in hpa.spec.metrics
    }
    assert targets == {"cpu": ("Utilization", 70), "memory": ("Utilization", 80)}
    [owner] = hpa.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (
        "ScalingProfile",
        "api",
        created["metadata"]["uid"],
        True,
    )
    assert hpa.metadata.labels["app.kubernetes.io/managed-by"] == "runbook-operator"

    # The originals were recorded; the named container has the runbook's numbers, the other is untouched.
    status = cluster.profile()["status"]
    assert status["originalResources"] == [{"container": "api", **ORIGINAL}]
    assert (status["minReplicas"], status["maxReplicas"], status["hpaName"]) == (2, 10, "api")
    assert _same_quantities(cluster.container_resources(), RUNBOOK_RESOURCES)
    assert cluster.container_resources("sidecar") == {}

    # The Deployment controller rolls a new ReplicaSet with the new resources.
    def new_replica_set() -> bool:
        sets = _replica_sets(cluster)
        return len(sets) == 2 and any(
            _same_quantities(
                cluster.api.sanitize_for_serialization(rs.spec.template.spec.containers[0].resources), RUNBOOK_RESOURCES
            )
            for rs in sets
        )

    cluster.wait_for(new_replica_set, what="the Deployment controller to roll a new ReplicaSet")
    assert {"HPACreated", "ResourcesApplied"} <= set(cluster.event_reasons())

    # A spec change that changes neither the HPA nor the resources writes neither (each write posts an Event).
    hpa_generation = cluster.hpa("api").metadata.generation
    deployment_generation = cluster.apps.read_namespaced_deployment("api", cluster.namespace).metadata.generation
    writes = cluster.event_counts()
    cluster.patch_spec("api", {"onDelete": "Restore", "adoptExisting": True})
    generation = cluster.profile()["metadata"]["generation"]
    cluster.wait_for(
        lambda: cluster.profile()["status"].get("observedGeneration") == generation, what="the spec change handled"
    )
    time.sleep(2)
    assert cluster.hpa("api").metadata.generation == hpa_generation
    assert (
        cluster.apps.read_namespaced_deployment("api", cluster.namespace).metadata.generation == deployment_generation
    )
    assert cluster.event_counts() == writes

    # Deleting the profile removes the HPA and restores the original resources.
    cluster.delete_profile()
    assert cluster.hpa("api") is None
    assert _same_quantities(cluster.container_resources(), ORIGINAL)


def test_on_delete_keep_leaves_hpa_and_resources(running: Cluster) -> None:
    cluster = _with_api(running)
    cluster.create_profile(
        profile(
            autoscaling=RUNBOOK_AUTOSCALING,
            resources=[{"container": "api", **RUNBOOK_RESOURCES}],
            onDelete="Keep",
        )
    )
    cluster.wait_condition("Ready", "True", "Reconciled")
    cluster.delete_profile()
    time.sleep(3)  # give the garbage collector the time to (wrongly) delete a still-owned HPA
    hpa = cluster.hpa("api")
    assert hpa is not None and not hpa.metadata.owner_references
    assert _same_quantities(cluster.container_resources(), RUNBOOK_RESOURCES)


# ------------------------------------------------------------------------------------ time and overrides


def test_override_pins_then_expires_on_time_with_an_event(running: Cluster) -> None:
    cluster = _with_api(running)
    until = (datetime.now(UTC) + timedelta(seconds=30)).replace(microsecond=0)
    cluster.create_profile(
        profile(
            autoscaling=RUNBOOK_AUTOSCALING,
            override={"replicas": 5, "until": until.strftime("%Y-%m-%dT%H:%M:%SZ"), "reason": "launch"},
        )
    )
    cluster.wait_condition("Ready", "True", "Reconciled")
    hpa = cluster.hpa("api")
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (5, 5)
    status = cluster.profile()["status"]
    assert status["overrideUntil"] == until.strftime("%Y-%m-%dT%H:%M:%SZ") == status["nextTransition"]
    # The HPA controller enforces the pinned bounds on the Deployment.
    cluster.wait_for(
        lambda: cluster.apps.read_namespaced_deployment("api", cluster.namespace).spec.replicas == 5,
        timeout=90,
        what="the HPA controller to scale api to 5",
    )

    cluster.wait_for(lambda: cluster.hpa("api").spec.min_replicas == 2, timeout=60, what="the override to expire")
    reverted_at = datetime.now(UTC)
    assert reverted_at >= until
    assert reverted_at - until < timedelta(seconds=5), f"override reverted {reverted_at - until} late"
    assert cluster.hpa("api").spec.max_replicas == 10
    cluster.wait_event("OverrideExpired")
    status = cluster.profile()["status"]
    assert "overrideUntil" not in status and (status["minReplicas"], status["maxReplicas"]) == (2, 10)


def test_window_opens_and_closes_on_its_edges(running: Cluster) -> None:
    cluster = _with_api(running)
    # Opens at every minute's start, for 20 seconds.
    window = {
        "name": "burst",
        "start": "* * * * *",
        "duration": "20s",
        "timeZone": "Europe/Berlin",
        "minReplicas": 4,
        "maxReplicas": 8,
    }
    # Start while the window is closed, so that its opening is seen.
    cluster.wait_for(lambda: 25 <= datetime.now(UTC).second < 45, timeout=60, what="the window to be closed")
    cluster.create_profile(profile(autoscaling=RUNBOOK_AUTOSCALING, windows=[window]))
    cluster.wait_condition("Ready", "True", "Reconciled")
    assert cluster.hpa("api").spec.min_replicas == 2

    cluster.wait_for(lambda: cluster.hpa("api").spec.min_replicas == 4, timeout=80, what="the window to open")
    opened_at = datetime.now(UTC)
    assert opened_at.second < 5, f"window applied at second {opened_at.second} of the minute"
    hpa = cluster.hpa("api")
    assert hpa.spec.max_replicas == 8
    # The pass patches the HPA, then writes its status: on a loaded machine the status lands a moment later.
    status = cluster.wait_for(
        lambda: (s := cluster.profile()["status"]).get("activeWindow") and s, timeout=10, what="activeWindow in status"
    )
    assert status["activeWindow"] == "burst"
    assert status["nextTransition"] == opened_at.replace(second=20, microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")

    cluster.wait_for(lambda: cluster.hpa("api").spec.min_replicas == 2, timeout=40, what="the window to close")
    closed_at = datetime.now(UTC)
    assert 20 <= closed_at.second < 25, f"window closed at second {closed_at.second}"
    cluster.wait_event("WindowOpened")
    cluster.wait_event("WindowClosed")
    cluster.wait_for(
        lambda: "activeWindow" not in cluster.profile()["status"], timeout=10, what="activeWindow gone from status"
    )


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"autoscaling": {**RUNBOOK_AUTOSCALING, "minReplicas": 11}}, "minReplicas must not exceed maxReplicas"),
        ({"autoscaling": {**RUNBOOK_AUTOSCALING, "cpuUtilization": -5}}, "spec.autoscaling.cpuUtilization"),
        ({"resources": [{"container": "api", "limits": {"memory": "1 gigabyte"}}]}, "spec.resources[0].limits.memory"),
        (
            {
                "autoscaling": RUNBOOK_AUTOSCALING,
                "override": {"replicas": 0, "until": "2030-01-01T00:00:00Z", "reason": "r"},
            },
            "spec.override.replicas",
        ),
        (
            {"windows": [{"name": "w", "start": "0 8 * * *", "duration": "1h", "minReplicas": 1, "maxReplicas": 2}]},
            "they need autoscaling",
        ),
    ],
)
def test_api_server_rejects_bad_specs(cluster: Cluster, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(kubernetes.client.ApiException) as error:
        cluster.create_profile(profile(**spec))
    assert error.value.status == 422
    assert message in error.value.body


def test_missing_target_is_retried_until_it_appears(running: Cluster) -> None:
    cluster = running
    cluster.create_profile(profile(autoscaling=RUNBOOK_AUTOSCALING))
    condition = cluster.wait_condition("Ready", "False", "TargetNotFound")
    assert condition["message"] == "spec.targetRef: Deployment api not found"
    cluster.wait_event("TargetNotFound")
    _with_api(cluster)
    cluster.wait_condition("Ready", "True", "Reconciled")
    assert cluster.hpa("api") is not None


def test_unknown_container_is_an_error(running: Cluster) -> None:
    cluster = _with_api(running)
    cluster.create_profile(profile(resources=[{"container": "web", "limits": {"cpu": "1"}}]))
    condition = cluster.wait_condition("Ready", "False", "UnknownContainer")
    assert (
        condition["message"]
        == "spec.resources[0].container: Deployment api has no container 'web' (it has: api, sidecar)"
    )
    cluster.wait_event("UnknownContainer")
    assert "originalResources" not in cluster.profile()["status"]
    assert _same_quantities(cluster.container_resources(), ORIGINAL)


@pytest.mark.parametrize(
    ("resources", "reason", "message"),
    [
        # The schema cannot compare two quantities; the operator does before it acts.
        ({"requests": {"cpu": "3"}, "limits": {"cpu": "2"}}, "InvalidSpec", "requests.cpu (3) exceeds limits.cpu (2)"),
        # Valid alone, invalid once merged with the workload's limit of 500m: the API server says so.
        ({"requests": {"cpu": "2"}}, "InvalidResources", "spec.resources: "),
    ],
)
def test_invalid_quantities_leave_the_workload_alone(
    running: Cluster, resources: dict[str, Any], reason: str, message: str
) -> None:
    cluster = _with_api(running)
    cluster.create_profile(profile(resources=[{"container": "api", **resources}]))
    condition = cluster.wait_condition("Ready", "False", reason)
    assert message in condition["message"]
    assert _same_quantities(cluster.container_resources(), ORIGINAL)


def _foreign_hpa(cluster: Cluster) -> None:
    cluster.hpas.create_namespaced_horizontal_pod_autoscaler(
        cluster.namespace,
        {
            "metadata": {"name": "api-by-hand"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"},
                "minReplicas": 1,
                "maxReplicas": 3,
            },
        },
    )


def test_conflicting_hpa_is_reported_then_adopted_and_given_back(running: Cluster) -> None:
    cluster = _with_api(running)
    _foreign_hpa(cluster)
    cluster.create_profile(profile(autoscaling=RUNBOOK_AUTOSCALING))
    conflict = cluster.wait_condition("Conflict", "True", "HPAConflict")
    assert "HorizontalPodAutoscaler api-by-hand already scales Deployment api" in conflict["message"]
    assert cluster.condition("Ready")["status"] == "False"
    original = cluster.hpa("api-by-hand")
    assert cluster.hpa("api") is None and original.spec.max_replicas == 3

    cluster.patch_spec("api", {"adoptExisting": True})
    cluster.wait_condition("Conflict", "False")
    cluster.wait_condition("Ready", "True", "Reconciled")
    adopted = cluster.hpa("api-by-hand")
    assert (adopted.spec.min_replicas, adopted.spec.max_replicas) == (2, 10)
    assert cluster.profile()["status"]["hpaName"] == "api-by-hand"
    cluster.wait_event("HPAAdopted")

    cluster.delete_profile()
    time.sleep(3)  # the garbage collector must not delete it: it was given back
    restored = cluster.hpa("api-by-hand")
    assert restored is not None and not restored.metadata.owner_references
    assert restored.spec == original.spec  # including the CPU 80 % metric the API server defaulted


@pytest.fixture
def vpa_crd(api: kubernetes.client.ApiClient, wait_for: WaitFor) -> Iterator[None]:
    """A minimal VerticalPodAutoscaler CRD (the real one's group, version and names; schema left open)."""
    extensions = kubernetes.client.ApiextensionsV1Api(api)
    crd = {
        # The group is one of Kubernetes' protected ones: the real CRD carries this approval too.
        "metadata": {
            "name": VPA_CRD,
            "annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes/kubernetes/pull/63797"},
        },
        "spec": {
            "group": "autoscaling.k8s.io",
            "scope": "Namespaced",
            "names": {
                "plural": "verticalpodautoscalers",
                "singular": "verticalpodautoscaler",
                "kind": "VerticalPodAutoscaler",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }
    try:
        extensions.create_custom_resource_definition(crd)
    except kubernetes.client.ApiException as error:
        if error.status != 409:
            raise

    def established() -> bool:
        conditions = extensions.read_custom_resource_definition(VPA_CRD).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for(established, timeout=30, what="the VPA CRD")
    yield
    extensions.delete_custom_resource_definition(VPA_CRD)


def test_vpa_on_the_same_resources_is_a_conflict(running: Cluster, vpa_crd: None) -> None:
    cluster = _with_api(running)
    vpa = {
        "apiVersion": "autoscaling.k8s.io/v1",
        "kind": "VerticalPodAutoscaler",
        "metadata": {"name": "api-vpa"},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"},
            "updatePolicy": {"updateMode": "Auto"},
            "resourcePolicy": {"containerPolicies": [{"containerName": "api", "controlledResources": ["memory"]}]},
        },
    }
    cluster.custom.create_namespaced_custom_object(
        "autoscaling.k8s.io", "v1", cluster.namespace, "verticalpodautoscalers", vpa
    )
    cluster.create_profile(profile(resources=[{"container": "api", **RUNBOOK_RESOURCES}]))
    conflict = cluster.wait_condition("Conflict", "True", "VPAConflict")
    assert conflict["message"] == "spec.resources: VerticalPodAutoscaler api-vpa also sets api/memory"
    assert "originalResources" not in cluster.profile()["status"]
    assert _same_quantities(cluster.container_resources(), ORIGINAL)


# ----------------------------------------------------------------------------------------------- interlock


def test_paused_during_emergency_isolation_and_resumed_on_release(running: Cluster) -> None:
    cluster = _with_api(running)
    cluster.create_profile(profile(autoscaling=RUNBOOK_AUTOSCALING))
    cluster.wait_condition("Ready", "True", "Reconciled")
    isolation = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "EmergencyIsolation",
        "metadata": {"name": "breach"},
        "spec": {
            "reason": "test",
            "incidentId": "INC-1",
            "network": {"isolate": False},
            "scaleToZero": {"enabled": False},
            "evidence": {"capture": False, "required": False},
        },
    }
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "emergencyisolations", isolation)
    paused = cluster.wait_condition("Paused", "True", "IsolationActive")
    assert "EmergencyIsolation breach" in paused["message"]
    assert cluster.profile()["status"]["phase"] == "Paused"

    # While paused, a change is not applied.
    cluster.patch_spec("api", {"autoscaling": {**RUNBOOK_AUTOSCALING, "minReplicas": 3}})
    generation = cluster.profile()["metadata"]["generation"]
    cluster.wait_for(
        lambda: cluster.profile()["status"].get("observedGeneration") == generation, what="the change seen"
    )
    assert cluster.hpa("api").spec.min_replicas == 2

    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, "emergencyisolations", "breach", {"spec": {"released": True}}
    )
    cluster.wait_condition("Paused", "False")
    cluster.wait_condition("Ready", "True", "Reconciled")
    assert cluster.hpa("api").spec.min_replicas == 3
    cluster.wait_event("Resumed")


def test_target_ref_is_immutable(cluster: Cluster) -> None:
    cluster.create_profile(profile(autoscaling=RUNBOOK_AUTOSCALING))
    with pytest.raises(kubernetes.client.ApiException) as error:
        cluster.patch_spec("api", {"targetRef": {"kind": "Deployment", "name": "web"}})
    assert error.value.status == 422
    assert "targetRef is immutable" in error.value.body


def test_statefulset_resources_are_applied_and_restored(running: Cluster) -> None:
    cluster = running
    labels = {"app": "redis"}
    cluster.apps.create_namespaced_stateful_set(
        cluster.namespace,
        {
            "metadata": {"name": "redis"},
            "spec": {
                "serviceName": "redis",
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "redis", "image": "registry.invalid/redis:7"}]},
                },
            },
        },
    )
    body = profile("redis", resources=[{"container": "redis", "limits": {"memory": "1Gi"}}])
    body["spec"]["targetRef"] = {"kind": "StatefulSet", "name": "redis"}
    cluster.create_profile(body)
    ready = cluster.wait_condition("Ready", "True", "Reconciled", name="redis")
    assert ready["message"] == "no autoscaling; resources of redis"

    def resources() -> dict[str, Any]:
        workload = cluster.apps.read_namespaced_stateful_set("redis", cluster.namespace)
        plain: dict[str, Any] = cluster.api.sanitize_for_serialization(
            workload.spec.template.spec.containers[0].resources
        )
        return plain or {}

    assert _same_quantities(resources(), {"limits": {"memory": "1Gi"}})
    assert cluster.profile("redis")["status"]["originalResources"] == [
        {"container": "redis", "requests": {}, "limits": {}}
    ]
    cluster.delete_profile("redis")
    assert resources() == {}


def test_a_restarted_operator_keeps_the_true_originals_and_writes_nothing(cluster: Cluster) -> None:
    """The originals live in status: a new operator process neither re-records them from the patched
    workload nor patches again; deletion by the second process restores the values from before the first."""
    _with_api(cluster)
    args = ["run", "--standalone", "-m", "runbook_operator.main", "--namespace", cluster.namespace]
    with kopf.testing.KopfRunner(args, timeout=60):
        cluster.create_profile(
            profile(autoscaling=RUNBOOK_AUTOSCALING, resources=[{"container": "api", **RUNBOOK_RESOURCES}])
        )
        cluster.wait_condition("Ready", "True", "Reconciled")
    generation = cluster.apps.read_namespaced_deployment("api", cluster.namespace).metadata.generation
    writes = cluster.event_counts()
    status = cluster.profile()["status"]
    passes = _passes()

    with kopf.testing.KopfRunner(args, timeout=60):
        cluster.wait_for(lambda: _passes() > passes, timeout=60, what="the resumed daemon's first pass to end")
        assert cluster.profile()["status"] == status
        assert cluster.apps.read_namespaced_deployment("api", cluster.namespace).metadata.generation == generation
        assert cluster.event_counts() == writes
        cluster.delete_profile()
    assert _same_quantities(cluster.container_resources(), ORIGINAL)
    assert cluster.hpa("api") is None
