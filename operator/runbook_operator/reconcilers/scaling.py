"""ScalingProfile: one declarative resource per workload for the runbook's horizontal and vertical scaling.

Each profile has one clock (a kopf daemon running ``run_clock``): it reconciles, then sleeps until the next
window edge or override expiry, a retry time, or a wake-up (the profile's spec changed, or an
EmergencyIsolation in the namespace changed). There is no polling: with nothing scheduled it sleeps until
woken. Every reconcile reads the profile fresh from the API server, which holds all state: the original
container resources and an adopted HPA's spec are written to status before the operator changes them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client import ApiException

from ..builders import scaling as build
from ..builders.common import owner_reference
from ..builders.windows import Bounds, effective_bounds
from ..clients import kube
from ..errors import RunbookError
from ..models import GROUP, VERSION
from ..models.scaling import OriginalResources, ScalingProfileSpec
from ..settings import FIELD_MANAGER
from .base import Clocks, StatusPatch, parse_spec, report_failure
from .interlock import active_isolation

KIND = "ScalingProfile"
PLURAL = "scalingprofiles"
VPA = ("autoscaling.k8s.io", "v1", "verticalpodautoscalers")
TARGET_RETRY = 10.0  # a missing workload may be created any moment
CONFLICT_RETRY = 60.0  # a conflicting HPA or VPA, or an unknown container, needs a person
CONFLICT_REASONS = {"HPAConflict", "VPAConflict"}
APPLY = "application/apply-patch+yaml"
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------------------ the clock

CLOCKS = Clocks()


async def run_clock(body: kopf.Body, *, stopped: kopf.DaemonStopped, now: Clock = utc_now) -> None:
    """The daemon: reconcile, sleep until the next transition, a retry or a wake-up, until kopf stops it."""
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)

    async def once() -> float | None:
        wake_at = await asyncio.to_thread(reconcile, namespace=namespace, name=name, now=now())
        return None if wake_at is None else max(0.0, (wake_at - now()).total_seconds())

    await CLOCKS.run(namespace=namespace, name=name, stopped=stopped, reconcile=once)


async def finalize(body: kopf.Body) -> None:
    """The deletion handler: Restore or Keep, after any running reconcile of the profile has finished."""
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)
    async with CLOCKS.lock(namespace, name):
        await asyncio.to_thread(release, namespace=namespace, name=name)


# --------------------------------------------------------------------------------------------- reconcile


def reconcile(*, namespace: str, name: str, now: datetime) -> datetime | None:
    """Converge the workload and its HPA on the profile; return when to reconcile next (None: when woken)."""
    body = _read_profile(namespace, name)
    if body is None or body.metadata.get("deletionTimestamp"):
        return None
    status = StatusPatch(body.get("status"), body["metadata"].get("generation"))
    try:
        wake_at = _converge(body, status, now)
    except Exception as raised:
        error = report_failure(body, status, raised)
        if error.reason in CONFLICT_REASONS:
            status.condition("Conflict", "True", error.reason, error.message)
        _write_status(namespace, name, status)
        raise error from None  # the clock retries it with backoff
    _write_status(namespace, name, status)
    return wake_at


def _converge(body: kopf.Body, status: StatusPatch, now: datetime) -> datetime | None:
    namespace = body["metadata"]["namespace"]
    spec = parse_spec(ScalingProfileSpec, body.get("spec"))
    status.set(target=spec.target_ref.name)
    isolation = active_isolation(namespace)
    if isolation is not None:
        message = f"EmergencyIsolation {isolation} is active in the namespace: not scaling until it is released"
        if status.get("phase") != "Paused":
            kopf.info(body, reason="Paused", message=message)
        status.condition("Paused", "True", "IsolationActive", message)
        status.condition("Ready", "False", "Paused", message)
        status.set(phase="Paused")
        return None  # the isolation's release wakes the clock
    if status.get("phase") == "Paused":
        kopf.info(body, reason="Resumed", message="no active EmergencyIsolation: reconciling again")
    status.condition("Paused", "False", "NotPaused")

    workload = _read_workload(namespace, spec)
    _check_containers(spec, workload)
    _check_vpas(namespace, spec)
    hpa_name = _check_hpas(body, spec, status) if spec.autoscaling is not None else None
    originals = _record_originals(body, spec, workload, status)
    _apply_resources(body, spec, workload, originals)

    bounds = effective_bounds(spec, now)
    if bounds is None or hpa_name is None:
        _release_hpa(body, status, keep=False)
        status.set(hpaName=None, minReplicas=None, maxReplicas=None, activeWindow=None, overrideUntil=None)
        status.set(nextTransition=None)
        summary = "no autoscaling"
    else:
        _apply_hpa(body, spec, hpa_name, bounds)
        _announce_transitions(body, status, bounds)
        status.set(
            hpaName=hpa_name,
            minReplicas=bounds.min_replicas,
            maxReplicas=bounds.max_replicas,
            activeWindow=bounds.window,
            overrideUntil=_rfc3339(bounds.override_until),
            nextTransition=_rfc3339(bounds.next_transition),
        )
        summary = f"HPA {hpa_name}: {bounds.min_replicas}..{bounds.max_replicas} replicas"
    containers = ", ".join(r.container for r in spec.resources)
    if containers:
        summary += f"; resources of {containers}"
    status.condition("Conflict", "False", "NoConflict")
    status.condition("Ready", "True", "Reconciled", summary)
    status.set(phase="Active")
    return bounds.next_transition if bounds is not None else None


def _announce_transitions(body: kopf.Body, status: StatusPatch, bounds: Bounds) -> None:
    """An Event for each window opening or closing and each override starting or ending."""
    bounds_text = f"{bounds.min_replicas}..{bounds.max_replicas} replicas"
    was_window, was_override = status.get("activeWindow"), status.get("overrideUntil")
    if bounds.override_until is not None and was_override is None:
        until = _rfc3339(bounds.override_until)
        kopf.info(body, reason="OverrideStarted", message=f"replicas pinned to {bounds_text} until {until}")
    elif bounds.override_until is None and was_override is not None:
        kopf.info(body, reason="OverrideExpired", message=f"override ended at {was_override}; now {bounds_text}")
    if bounds.window != was_window:
        if was_window is not None:
            kopf.info(body, reason="WindowClosed", message=f"window {was_window} closed")
        if bounds.window is not None:
            kopf.info(body, reason="WindowOpened", message=f"window {bounds.window} open: {bounds_text}")


# ------------------------------------------------------------------------------------------------- checks


def _read_workload(namespace: str, spec: ScalingProfileSpec) -> dict[str, Any]:
    ref = spec.target_ref
    read = (
        kube.apps().read_namespaced_deployment if ref.kind == "Deployment" else kube.apps().read_namespaced_stateful_set
    )
    try:
        return _plain(read(ref.name, namespace))
    except ApiException as error:
        if error.status == 404:
            raise RunbookError(
                "TargetNotFound", f"spec.targetRef: {ref.kind} {ref.name} not found", retry_after=TARGET_RETRY
            ) from None
        raise


def _check_containers(spec: ScalingProfileSpec, workload: dict[str, Any]) -> None:
    present = build.containers_of(workload)
    for index, wanted in enumerate(spec.resources):
        if wanted.container not in present:
            raise RunbookError(
                "UnknownContainer",
                f"spec.resources[{index}].container: {spec.target_ref.kind} {spec.target_ref.name} has no "
                f"container {wanted.container!r} (it has: {', '.join(sorted(present))})",
                retry_after=CONFLICT_RETRY,
            )


def _check_vpas(namespace: str, spec: ScalingProfileSpec) -> None:
    """A VerticalPodAutoscaler setting the same container resources is a conflict (no CRD: no VPAs)."""
    if not spec.resources:
        return
    try:
        vpas = kube.custom().list_namespaced_custom_object(*VPA[:2], namespace, VPA[2]).get("items", [])
    except ApiException as error:
        if error.status == 404:  # the VPA CRD is not installed
            return
        raise
    for vpa in vpas:
        overlap = build.vpa_overlap(vpa, spec.target_ref, spec.resources)
        if overlap:
            raise RunbookError(
                "VPAConflict",
                f"spec.resources: VerticalPodAutoscaler {vpa['metadata']['name']} also sets {', '.join(overlap)}",
                retry_after=CONFLICT_RETRY,
            )


def _check_hpas(body: kopf.Body, spec: ScalingProfileSpec, status: StatusPatch) -> str:
    """The name of the HPA the profile manages; an HPA of someone else's is a conflict unless adopted."""
    namespace, uid = body["metadata"]["namespace"], body["metadata"]["uid"]
    hpas = [_plain(h) for h in kube.autoscaling().list_namespaced_horizontal_pod_autoscaler(namespace).items]
    ours = [h for h in hpas if _owned(h, uid)]
    foreign = [h for h in hpas if not _owned(h, uid) and build.targets(h, spec.target_ref)]
    ref = f"{spec.target_ref.kind} {spec.target_ref.name}"
    adoptable = len(foreign) == 1 and not ours
    if foreign and not (adoptable and spec.adopt_existing):
        names = ", ".join(h["metadata"]["name"] for h in foreign)
        remedy = (
            "delete it or set spec.adoptExisting: true to take it over"
            if adoptable
            else "only one HPA may scale a workload: delete the others"
        )
        raise RunbookError(
            "HPAConflict",
            f"spec.targetRef: HorizontalPodAutoscaler {names} already scales {ref}; {remedy}",
            retry_after=CONFLICT_RETRY,
        )
    if foreign:
        adopted = foreign[0]
        if status.get("adoptedHpaSpec") is None:
            original = json.dumps(adopted["spec"], sort_keys=True)
            _record(body, status, adoptedHpaSpec=original)
            kopf.info(
                body, reason="HPAAdopted", message=f"took over HorizontalPodAutoscaler {adopted['metadata']['name']}"
            )
        return str(adopted["metadata"]["name"])
    if ours:
        return str(ours[0]["metadata"]["name"])
    name = str(body["metadata"]["name"])
    if any(h["metadata"]["name"] == name for h in hpas):
        raise RunbookError(
            "HPAConflict",
            f"metadata.name: a HorizontalPodAutoscaler {name} that the profile does not own already exists",
            retry_after=CONFLICT_RETRY,
        )
    return name


# ------------------------------------------------------------------------------------------------ actions


def _record_originals(
    body: kopf.Body, spec: ScalingProfileSpec, workload: dict[str, Any], status: StatusPatch
) -> list[OriginalResources]:
    """The containers' resources before the profile, written to status before anything is patched."""
    originals = [OriginalResources.model_validate(o) for o in status.get("originalResources") or []]
    known = {o.container for o in originals}
    containers = build.containers_of(workload)
    new = [build.record_original(containers[r.container]) for r in spec.resources if r.container not in known]
    if new:
        originals += new
        _record(body, status, originalResources=[o.to_api() for o in originals])
    return originals


def _apply_resources(
    body: kopf.Body, spec: ScalingProfileSpec, workload: dict[str, Any], originals: list[OriginalResources]
) -> None:
    desired = build.desired_resources(spec.resources, originals)
    if not desired or build.resources_up_to_date(workload, desired):
        return
    _apply_workload(body["metadata"]["namespace"], spec, desired)
    changed = ", ".join(sorted(desired))
    kopf.info(body, reason="ResourcesApplied", message=f"set resources of containers {changed}")


def _apply_workload(namespace: str, spec: ScalingProfileSpec, resources: build.ContainerResourceMap) -> None:
    config = build.build_resources_apply(spec.target_ref, namespace, resources)
    name = spec.target_ref.name
    patch = (
        kube.apps().patch_namespaced_deployment
        if spec.target_ref.kind == "Deployment"
        else kube.apps().patch_namespaced_stateful_set
    )
    try:
        patch(name, namespace, config, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY)
    except ApiException as error:
        if error.status == 422:  # e.g. a request above its limit once merged with what the workload has
            raise RunbookError("InvalidResources", f"spec.resources: {_api_message(error)}") from None
        raise


def _apply_hpa(body: kopf.Body, spec: ScalingProfileSpec, name: str, bounds: Bounds) -> None:
    assert spec.autoscaling is not None
    namespace = body["metadata"]["namespace"]
    hpa_spec = build.build_hpa_spec(
        spec.autoscaling, spec.target_ref, min_replicas=bounds.min_replicas, max_replicas=bounds.max_replicas
    )
    desired = build.build_hpa(hpa_spec, name=name, namespace=namespace, owner=owner_reference(body))
    current = _read_hpa(namespace, name)
    if current is not None and build.hpa_up_to_date(current, desired):
        return
    kube.autoscaling().patch_namespaced_horizontal_pod_autoscaler(
        name, namespace, desired, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY
    )
    verb = "created" if current is None else "updated"
    kopf.info(
        body,
        reason="HPACreated" if current is None else "HPAUpdated",
        message=f"HorizontalPodAutoscaler {name} {verb}: {bounds.min_replicas}..{bounds.max_replicas} replicas",
    )


def release(*, namespace: str, name: str) -> None:
    """On deletion: put back the original resources and HPA (onDelete: Restore) or leave both (Keep)."""
    body = _read_profile(namespace, name)
    if body is None:
        return
    keep = (body.get("spec") or {}).get("onDelete") == "Keep"
    status = StatusPatch(body.get("status"), None)
    _release_hpa(body, status, keep=keep)
    if keep:
        kopf.info(body, reason="Kept", message="onDelete: Keep: the workload's resources stay as they are")
        return
    originals = [OriginalResources.model_validate(o) for o in status.get("originalResources") or []]
    if not originals:
        return
    try:
        spec = ScalingProfileSpec.model_validate(body.get("spec") or {})
        workload = _read_workload(namespace, spec)
    except (RunbookError, ValueError):
        return  # no valid target: nothing of ours to restore
    present = build.containers_of(workload)
    restore = build.original_resources([o for o in originals if o.container in present])
    if restore and not build.resources_up_to_date(workload, restore):
        _apply_workload(namespace, spec, restore)
        kopf.info(body, reason="ResourcesRestored", message=f"restored resources of {', '.join(sorted(restore))}")


def _release_hpa(body: kopf.Body, status: StatusPatch, *, keep: bool) -> None:
    """Delete the HPA the profile created, give an adopted one back its spec; with ``keep``, only disown it."""
    name = status.get("hpaName")
    namespace = body["metadata"]["namespace"]
    current = _read_hpa(namespace, name) if name else None
    if current is None or not _owned(current, body["metadata"]["uid"]):
        return
    adopted = status.get("adoptedHpaSpec")
    api = kube.autoscaling()
    if keep or adopted is not None:
        current["metadata"]["ownerReferences"] = [
            r for r in current["metadata"].get("ownerReferences", []) if r.get("uid") != body["metadata"]["uid"]
        ]
        if adopted is not None and not keep:
            current["spec"] = json.loads(adopted)
            (current["metadata"].get("annotations") or {}).pop(build.APPLIED_HASH, None)
        api.replace_namespaced_horizontal_pod_autoscaler(name, namespace, current)
        action = "left in place" if keep else "given back its original spec"
        kopf.info(body, reason="HPAReleased", message=f"HorizontalPodAutoscaler {name} {action}")
        if not keep:
            _record(body, status, adoptedHpaSpec=None)
        return
    try:
        api.delete_namespaced_horizontal_pod_autoscaler(name, namespace)
    except ApiException as error:
        if error.status != 404:
            raise
    kopf.info(body, reason="HPADeleted", message=f"HorizontalPodAutoscaler {name} deleted")


# ---------------------------------------------------------------------------------------------- API calls


def _read_profile(namespace: str, name: str) -> kopf.Body | None:
    """The profile as the API server has it now (the daemon's body may lag behind our own writes)."""
    try:
        return kopf.Body(kube.custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def _read_hpa(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _plain(kube.autoscaling().read_namespaced_horizontal_pod_autoscaler(name, namespace))
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def _record(body: kopf.Body, status: StatusPatch, **fields: Any) -> None:
    """Write what the operator needs to undo an action to status now, before the action."""
    meta = body["metadata"]
    kube.custom().patch_namespaced_custom_object_status(
        GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": fields}
    )
    status.set(**fields)


def _write_status(namespace: str, name: str, status: StatusPatch) -> None:
    try:
        status.write(plural=PLURAL, namespace=namespace, name=name)
    except ApiException as error:
        if error.status != 404:  # deleted meanwhile
            raise


def _owned(obj: dict[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj.get("metadata", {}).get("ownerReferences") or [])


def _plain(obj: Any) -> dict[str, Any]:
    """A typed client object as the API's camelCase dict."""
    plain: dict[str, Any] = kube.api_client().sanitize_for_serialization(obj)
    return plain


def _api_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body)["message"])
    except (TypeError, ValueError, KeyError):
        return f"HTTP {error.status}"


def _rfc3339(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
