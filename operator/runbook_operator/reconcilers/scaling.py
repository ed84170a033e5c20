"""ScalingProfile: one declarative resource per workload for the runbook's horizontal and vertical scaling.

``PROFILE`` is the kind's ``Reconciler``. Each profile has one clock (a kopf daemon running ``run_clock``, a
``runtime.Clocks`` loop): a pass, then sleep for the pass's ``Result`` (until the next window edge or
override expiry, a retry time) or until woken (the profile's spec changed, or an EmergencyIsolation in the
namespace changed). With nothing scheduled it sleeps until woken. Every pass reads the profile fresh from the
API server, which holds all state: the original container resources and an adopted HPA's spec are written to
status (``Context.checkpoint``) before the operator changes them.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes.client import ApiException

from ..builders import scaling as build
from ..builders.common import owner_reference
from ..builders.windows import Bounds, effective_bounds
from ..clients import kube
from ..errors import RunbookError
from ..models.common import rfc3339
from ..models.scaling import OriginalResources, ScalingPhase, ScalingProfileSpec, ScalingProfileStatus
from . import runtime
from .runtime import Context, Reconciler, Result

PROFILES = kube.custom_resource("scalingprofiles", "ScalingProfile")
VPAS = kube.Resource("autoscaling.k8s.io", "v1", "verticalpodautoscalers", "VerticalPodAutoscaler")
TARGET_RETRY = 10.0  # a missing workload may be created any moment
CONFLICT_RETRY = 60.0  # a conflicting HPA or VPA, or an unknown container, needs a person
CONFLICT_REASONS = {"HPAConflict", "VPAConflict"}
Ctx = Context[ScalingProfileSpec, ScalingProfileStatus]


# ------------------------------------------------------------------------------------------------ the clock

CLOCKS = runtime.Clocks()


# --------------------------------------------------------------------------------------------- reconcile


def reconcile(ctx: Ctx) -> Result:
    """Converge the workload and its HPA on the profile; requeue at the next window edge or override expiry
    (done: until woken)."""
    if ctx.body["metadata"].get("deletionTimestamp"):
        return Result.done()
    try:
        return _converge(ctx)
    except RunbookError as error:
        if error.reason in CONFLICT_REASONS:
            ctx.condition("Conflict", "True", error.reason, error.message)
        raise  # reported by the runtime (Ready=False, a Warning Event), retried after its retry_after


def _converge(ctx: Ctx) -> Result:
    spec, status = ctx.spec, ctx.status
    status.target = spec.target_ref.name
    isolation = ctx.isolation(ctx.namespace)
    if isolation is not None:
        message = f"EmergencyIsolation {isolation} is active in the namespace: not scaling until it is released"
        if status.phase != ScalingPhase.PAUSED:
            ctx.event("Normal", "Paused", message)
        ctx.condition("Paused", "True", "IsolationActive", message)
        ctx.condition("Ready", "False", "Paused", message)
        status.phase = ScalingPhase.PAUSED
        return Result.done()  # the isolation's release wakes the clock
    if status.phase == ScalingPhase.PAUSED:
        ctx.event("Normal", "Resumed", "no active EmergencyIsolation: reconciling again")
    ctx.condition("Paused", "False", "NotPaused")

    workload = _read_workload(ctx, spec)
    _check_containers(spec, workload)
    _check_vpas(ctx, spec)
    hpa_name = _check_hpas(ctx, spec) if spec.autoscaling is not None else None
    originals = _record_originals(ctx, spec, workload)
    _apply_resources(ctx, spec, workload, originals)

    bounds = effective_bounds(spec, ctx.now())
    if bounds is None or hpa_name is None:
        _release_hpa(ctx, keep=False)
        status.hpa_name = status.min_replicas = status.max_replicas = None
        status.active_window = status.override_until = status.next_transition = None
        summary = "no autoscaling"
    else:
        _apply_hpa(ctx, spec, hpa_name, bounds)
        _announce_transitions(ctx, bounds)
        status.hpa_name = hpa_name
        status.min_replicas, status.max_replicas = bounds.min_replicas, bounds.max_replicas
        status.active_window = bounds.window
        status.override_until = _rfc3339(bounds)
        status.next_transition = None if bounds.next_transition is None else rfc3339(bounds.next_transition)
        summary = f"HPA {hpa_name}: {bounds.min_replicas}..{bounds.max_replicas} replicas"
    containers = ", ".join(r.container for r in spec.resources)
    if containers:
        summary += f"; resources of {containers}"
    ctx.condition("Conflict", "False", "NoConflict")
    ctx.condition("Ready", "True", "Reconciled", summary)
    status.phase = ScalingPhase.ACTIVE
    if bounds is None or bounds.next_transition is None:
        return Result.done()
    return Result.after((bounds.next_transition - ctx.now()).total_seconds())


def _rfc3339(bounds: Bounds) -> str | None:
    return None if bounds.override_until is None else rfc3339(bounds.override_until)


def _announce_transitions(ctx: Ctx, bounds: Bounds) -> None:
    """An Event for each window opening or closing and each override starting or ending."""
    bounds_text = f"{bounds.min_replicas}..{bounds.max_replicas} replicas"
    was_window, was_override = ctx.status.active_window, ctx.status.override_until
    if bounds.override_until is not None and was_override is None:
        message = f"replicas pinned to {bounds_text} until {_rfc3339(bounds)}"
        ctx.event("Normal", "OverrideStarted", message)
    elif bounds.override_until is None and was_override is not None:
        ctx.event("Normal", "OverrideExpired", f"override ended at {was_override}; now {bounds_text}")
    if bounds.window != was_window:
        if was_window is not None:
            ctx.event("Normal", "WindowClosed", f"window {was_window} closed")
        if bounds.window is not None:
            ctx.event("Normal", "WindowOpened", f"window {bounds.window} open: {bounds_text}")


# ------------------------------------------------------------------------------------------------- checks


def _read_workload(ctx: Ctx, spec: ScalingProfileSpec) -> dict[str, Any]:
    ref = spec.target_ref
    workload = ctx.api.get(kube.workload(ref.kind), ctx.namespace, ref.name)
    if workload is None:
        raise RunbookError(
            "TargetNotFound", f"spec.targetRef: {ref.kind} {ref.name} not found", retry_after=TARGET_RETRY
        )
    return workload


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


def _check_vpas(ctx: Ctx, spec: ScalingProfileSpec) -> None:
    """A VerticalPodAutoscaler setting the same container resources is a conflict (no CRD: no VPAs)."""
    if not spec.resources:
        return
    for vpa in ctx.api.list(VPAS, ctx.namespace):
        overlap = build.vpa_overlap(vpa, spec.target_ref, spec.resources)
        if overlap:
            raise RunbookError(
                "VPAConflict",
                f"spec.resources: VerticalPodAutoscaler {vpa['metadata']['name']} also sets {', '.join(overlap)}",
                retry_after=CONFLICT_RETRY,
            )


def _check_hpas(ctx: Ctx, spec: ScalingProfileSpec) -> str:
    """The name of the HPA the profile manages; an HPA of someone else's is a conflict unless adopted."""
    uid = ctx.body["metadata"]["uid"]
    hpas = ctx.api.list(kube.HPAS, ctx.namespace)
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
        if ctx.status.adopted_hpa_spec is None:
            ctx.status.adopted_hpa_spec = json.dumps(adopted["spec"], sort_keys=True)
            ctx.checkpoint()  # what giving it back needs, written before it is changed
            ctx.event("Normal", "HPAAdopted", f"took over HorizontalPodAutoscaler {adopted['metadata']['name']}")
        return str(adopted["metadata"]["name"])
    if ours:
        return str(ours[0]["metadata"]["name"])
    if any(h["metadata"]["name"] == ctx.name for h in hpas):
        raise RunbookError(
            "HPAConflict",
            f"metadata.name: a HorizontalPodAutoscaler {ctx.name} that the profile does not own already exists",
            retry_after=CONFLICT_RETRY,
        )
    return ctx.name


# ------------------------------------------------------------------------------------------------ actions


def _record_originals(ctx: Ctx, spec: ScalingProfileSpec, workload: dict[str, Any]) -> list[OriginalResources]:
    """The containers' resources before the profile, written to status before anything is patched."""
    originals = list(ctx.status.original_resources)
    known = {o.container for o in originals}
    containers = build.containers_of(workload)
    new = [build.record_original(containers[r.container]) for r in spec.resources if r.container not in known]
    if new:
        ctx.status.original_resources = originals + new
        ctx.checkpoint()
    return ctx.status.original_resources


def _apply_resources(
    ctx: Ctx, spec: ScalingProfileSpec, workload: dict[str, Any], originals: list[OriginalResources]
) -> None:
    desired = build.desired_resources(spec.resources, originals)
    if not desired or build.resources_up_to_date(workload, desired):
        return
    _apply_workload(ctx, spec, desired)
    ctx.event("Normal", "ResourcesApplied", f"set resources of containers {', '.join(sorted(desired))}")


def _apply_workload(ctx: Ctx, spec: ScalingProfileSpec, resources: build.ContainerResourceMap) -> None:
    config = build.build_resources_apply(spec.target_ref, ctx.namespace, resources)
    try:
        ctx.api.apply(kube.workload(spec.target_ref.kind), ctx.namespace, config)
    except ApiException as error:
        if error.status == 422:  # e.g. a request above its limit once merged with what the workload has
            raise RunbookError("InvalidResources", f"spec.resources: {kube.server_message(error)}") from None
        raise


def _apply_hpa(ctx: Ctx, spec: ScalingProfileSpec, name: str, bounds: Bounds) -> None:
    assert spec.autoscaling is not None
    hpa_spec = build.build_hpa_spec(
        spec.autoscaling, spec.target_ref, min_replicas=bounds.min_replicas, max_replicas=bounds.max_replicas
    )
    desired = build.build_hpa(hpa_spec, name=name, namespace=ctx.namespace, owner=owner_reference(ctx.body))
    current = ctx.api.get(kube.HPAS, ctx.namespace, name)
    if current is not None and build.hpa_up_to_date(current, desired):
        return
    ctx.api.apply(kube.HPAS, ctx.namespace, desired)
    verb = "created" if current is None else "updated"
    ctx.event(
        "Normal",
        "HPACreated" if current is None else "HPAUpdated",
        f"HorizontalPodAutoscaler {name} {verb}: {bounds.min_replicas}..{bounds.max_replicas} replicas",
    )


def finalize_profile(ctx: Ctx) -> Result:
    """On deletion: put back the original resources and HPA (onDelete: Restore) or leave both (Keep)."""
    keep = (ctx.body.get("spec") or {}).get("onDelete") == "Keep"  # honoured even for a spec now invalid
    _release_hpa(ctx, keep=keep)
    if keep:
        ctx.event("Normal", "Kept", "onDelete: Keep: the workload's resources stay as they are")
        return Result.done()
    originals = ctx.status.original_resources
    if not originals:
        return Result.done()
    try:
        spec = ctx.spec
        workload = _read_workload(ctx, spec)
    except RunbookError:
        return Result.done()  # no valid target: nothing of ours to restore
    present = build.containers_of(workload)
    restore = build.original_resources([o for o in originals if o.container in present])
    if restore and not build.resources_up_to_date(workload, restore):
        _apply_workload(ctx, spec, restore)
        ctx.event("Normal", "ResourcesRestored", f"restored resources of {', '.join(sorted(restore))}")
    return Result.done()


def _release_hpa(ctx: Ctx, *, keep: bool) -> None:
    """Delete the HPA the profile created, give an adopted one back its spec; with ``keep``, only disown it."""
    name = ctx.status.hpa_name
    uid = ctx.body["metadata"]["uid"]
    current = ctx.api.get(kube.HPAS, ctx.namespace, name) if name else None
    if name is None or current is None or not _owned(current, uid):
        return
    adopted = ctx.status.adopted_hpa_spec
    if keep or adopted is not None:
        metadata: dict[str, Any] = {
            "resourceVersion": current["metadata"]["resourceVersion"],  # as a replace would: conflict-safe
            "ownerReferences": [r for r in current["metadata"].get("ownerReferences", []) if r.get("uid") != uid],
        }
        patch: dict[str, Any] = {"metadata": metadata}
        if adopted is not None and not keep:
            patch["spec"] = runtime.merge_diff(current["spec"], json.loads(adopted))
            if build.APPLIED_HASH in (current["metadata"].get("annotations") or {}):
                metadata["annotations"] = {build.APPLIED_HASH: None}
        ctx.api.patch(kube.HPAS, ctx.namespace, name, patch)
        action = "left in place" if keep else "given back its original spec"
        ctx.event("Normal", "HPAReleased", f"HorizontalPodAutoscaler {name} {action}")
        if not keep:
            ctx.status.adopted_hpa_spec = None
            ctx.checkpoint()
        return
    ctx.api.delete(kube.HPAS, ctx.namespace, name)
    ctx.event("Normal", "HPADeleted", f"HorizontalPodAutoscaler {name} deleted")


PROFILE = Reconciler(PROFILES, ScalingProfileSpec, ScalingProfileStatus, reconcile, finalize=finalize_profile)


# ------------------------------------------------------------------------------------------------ helpers


def _owned(obj: dict[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj.get("metadata", {}).get("ownerReferences") or [])
