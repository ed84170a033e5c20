"""EmergencyIsolation: admit, contain the network, snapshot, preserve evidence, scale to zero; release exactly.

Every pass reads the cluster and converges, so a restart at any point resumes: the network policy goes first
(pure containment, removed on release), the snapshot is written to the workloads and to status before any
workload is touched, and evidence is committed before anything is scaled. Release works from the snapshot
annotations on the workloads, so it stays exact even if status was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import aiohttp
from kubernetes.client import ApiException

from .. import metrics
from ..builders.common import owner_reference
from ..builders.isolation import (
    POLICY_NAME,
    annotate_patch,
    build_network_policy,
    checked_policy,
    deny_all_spec,
    is_stopped,
    recorded_snapshot,
    recorded_state,
    requested_by,
    restore_patch,
    save_policy,
    saved_policies_name,
    scaled_summary,
    snapshot_workloads,
    stop_patch,
    workload_state,
)
from ..clients import kube
from ..conditions import now_rfc3339
from ..errors import RunbookError, parse_spec
from ..logs import audit
from ..models.isolation import (
    EmergencyIsolationSpec,
    EmergencyIsolationStatus,
    IsolationPhase,
    NetworkIsolation,
    SavedPolicy,
    WorkloadSnapshot,
)
from . import evidence, tenancy
from .runtime import (
    CONTAINMENT,
    Context,
    GrantsOf,
    Isolation,
    Reconciler,
    Result,
    as_failure,
    blocking,
    merge_diff,
    run_pass,
)

LOG = logging.getLogger(__name__)
KIND = "EmergencyIsolation"
EMERGENCY_ISOLATIONS = kube.custom_resource("emergencyisolations", KIND)
EVIDENCE_RETRY = 10.0  # seconds between attempts to capture evidence that failed for a fixable reason

Ctx = Context[EmergencyIsolationSpec, EmergencyIsolationStatus]
Phase = IsolationPhase


# --- workloads: one read and one write path -------------------------------------------------------------------
def _workloads(api: kube.Api, namespace: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Every Deployment, StatefulSet and CronJob of the namespace by (kind, name); each dict carries its kind."""
    return {
        (kind, item["metadata"]["name"]): {**item, "kind": kind}
        for kind in kube.WORKLOADS
        for item in api.list(kube.workload(kind), namespace)
    }


def _patch_workload(api: kube.Api, namespace: str, kind: str, name: str, patch: Mapping[str, Any]) -> None:
    """A patch of a workload; a replica count in it goes through the ``/scale`` subresource first."""
    resource = kube.workload(kind)
    spec = dict(patch.get("spec") or {})
    if "replicas" in spec:
        api.patch(resource, namespace, name, {"spec": {"replicas": spec.pop("replicas")}}, subresource="scale")
    rest = {key: value for key, value in patch.items() if key != "spec"}
    if spec:
        rest["spec"] = spec
    if rest:
        api.patch(resource, namespace, name, rest)


# --- status, Events, audit -------------------------------------------------------------------------------------
def _audit(ctx: Ctx, event: str, step: str, **fields: Any) -> None:
    spec = ctx.body.get("spec") or {}
    audit(
        event,
        namespace=ctx.namespace,
        name=ctx.name,
        kind=KIND,
        step=step,
        incidentId=spec.get("incidentId"),
        severity=spec.get("severity", "P1"),
        requestedBy=requested_by(dict(ctx.body["metadata"])),
        **fields,
    )


def _foreseen(ctx: Ctx, error: RunbookError) -> Result:
    """A failure the pass foresaw (evidence that cannot be captured yet, a second isolation): reported, and
    retried at its own pace (every ``retry_after`` seconds, since a responder waits on it) rather than with
    backoff, or left until the spec changes."""
    ctx.fail(error)
    return Result.after(error.retry_after) if error.retry_after is not None else Result.failed(error, 0)


# --- isolate ---------------------------------------------------------------------------------------------------
def isolate(ctx: Ctx, *, seen: float) -> None:
    phase = ctx.status.phase
    if phase in (Phase.RELEASED, Phase.REJECTED):
        return
    try:
        spec = ctx.spec
    except RunbookError:
        if not (ctx.status.isolated_at or ctx.status.snapshot):
            ctx.status.phase = Phase.INVALID
        raise
    # the evidence bucket as the tenancy rules allow it, before anything is created or uploaded
    tenancy.confine_emergency_isolation(ctx.grants(ctx.namespace), ctx.namespace, spec)
    holder = ctx.isolation(ctx.namespace)
    if holder not in (None, ctx.name):
        _audit(ctx, "isolation_rejected", "rejected", holder=holder)
        ctx.status.phase = Phase.REJECTED
        raise RunbookError(
            "AlreadyIsolated",
            f"namespace {ctx.namespace} is already isolated by EmergencyIsolation {holder}; "
            "release that one first (this one changes nothing)",
        )
    if spec.network.isolate:
        contain(ctx, spec.network, seen=seen)
    admit(ctx, spec)
    metrics.ISOLATIONS_ACTIVE.labels(ctx.namespace).set(1)
    metrics.ISOLATION_INFO.labels(ctx.namespace, ctx.name, spec.incident_id, spec.severity).set(1)
    if spec.network.isolate:
        existing_policies(ctx, spec.network)
    if phase != Phase.ISOLATED:  # once isolated, changes made by hand are the responder's, not drift
        snapshot = take_snapshot(ctx, spec)
        if spec.evidence.capture:
            preserve_evidence(ctx, spec)
        else:
            ctx.condition("EvidencePreserved", "False", "CaptureDisabled", "spec.evidence.capture is false")
        if spec.scale_to_zero.enabled:
            scale_to_zero(ctx, snapshot)
    ctx.status.phase = Phase.ISOLATED
    ctx.condition("Ready", "True", "Isolated", summary(ctx, spec))


def summary(ctx: Ctx, spec: EmergencyIsolationSpec) -> str:
    parts = [f"network {'contained' if spec.network.isolate else 'open (network.isolate false)'}"]
    if spec.evidence.capture:
        preserved = ctx.status.evidence is not None and ctx.status.evidence.key
        parts.append("evidence preserved" if preserved else "evidence NOT preserved (see EvidencePreserved)")
    if spec.scale_to_zero.enabled:
        parts.append(f"{ctx.status.scaled} workloads at zero")
    return ", ".join(parts)


def contain(ctx: Ctx, network: NetworkIsolation, *, seen: float | None = None) -> bool:
    """Create (or converge) the deny-all policy: the first write, so containment does not wait on anything.
    Reads it first and writes only what differs. Returns whether it wrote."""
    desired = _desired_policy(ctx, network)
    current = ctx.api.get(kube.NETWORK_POLICIES, ctx.namespace, POLICY_NAME)
    if current is None and ctx.api.create(kube.NETWORK_POLICIES, ctx.namespace, desired):
        if ctx.status.isolated_at:  # deleted by hand during the isolation: put back
            ctx.event("Warning", "NetworkContained", f"NetworkPolicy {POLICY_NAME} was missing; recreated")
            _audit(ctx, "isolation_applied", "network_recontained", policy=POLICY_NAME)
            return True
        _contained(ctx, seen=seen)
        _record_contained(ctx)
        return True
    if current is None:  # created by someone else between the read and the create
        current = ctx.api.get(kube.NETWORK_POLICIES, ctx.namespace, POLICY_NAME) or {"metadata": {}, "spec": {}}
    owners = [o for o in current["metadata"].get("ownerReferences") or [] if o.get("kind") == KIND]
    if owners and owners[0]["uid"] != ctx.body["metadata"]["uid"]:
        # Another isolation got here first (the index cannot order two created at once) or is still
        # releasing: try again shortly, when the index decides or the policy is gone.
        raise RunbookError(
            "AlreadyIsolated",
            f"NetworkPolicy {POLICY_NAME} belongs to EmergencyIsolation {owners[0]['name']}",
            retry_after=5,
        )
    if owners and current.get("spec") == desired["spec"]:
        if not ctx.status.isolated_at:  # created by the fast path, which stopped before it wrote isolatedAt
            ctx.status.isolated_at = current["metadata"].get("creationTimestamp") or now_rfc3339()
        return False
    # A hand-made emergency-isolate (the runbook's script) is adopted; a drifted one is put back.
    metadata = desired["metadata"]
    patch = {
        "metadata": {"labels": metadata["labels"], "ownerReferences": metadata["ownerReferences"]},
        "spec": merge_diff(current.get("spec") or {}, desired["spec"]),
    }
    ctx.api.patch(kube.NETWORK_POLICIES, ctx.namespace, POLICY_NAME, patch)
    ctx.event("Normal", "NetworkContained", f"NetworkPolicy {POLICY_NAME} set to deny all traffic")
    return True


def _desired_policy(ctx: Ctx, network: NetworkIsolation) -> dict[str, Any]:
    owner = owner_reference(ctx.body, block_owner_deletion=False)
    return build_network_policy(network, namespace=ctx.namespace, owner=owner)


def _contained(ctx: Ctx, *, seen: float | None) -> None:
    """The time to contain of the isolation's first containment, just done."""
    created = ctx.body["metadata"]["creationTimestamp"]
    contained = time.time()
    metrics.ISOLATION_TIME_TO_CONTAIN.observe(
        time_to_contain(created, seen=contained if seen is None else seen, contained=contained)
    )


def _record_contained(ctx: Ctx, *, write: bool = False) -> None:
    """What tells of the first containment: ``isolatedAt`` (in ``ctx.status``; with ``write`` also written, and
    alone), the Event and the audit record."""
    ctx.status.isolated_at = now_rfc3339()
    if write:  # the fast path: not ``checkpoint``, the pass owns every other status field (observedGeneration too)
        patch = {"status": {"isolatedAt": ctx.status.isolated_at}}
        ctx.api.patch(ctx.resource, ctx.namespace, ctx.name, patch, subresource="status")
    ctx.event("Normal", "NetworkContained", f"NetworkPolicy {POLICY_NAME} denies all ingress and egress")
    _audit(ctx, "isolation_applied", "network_contained", policy=POLICY_NAME)


def admit(ctx: Ctx, spec: EmergencyIsolationSpec) -> None:
    if ctx.status.requested_by is not None:
        return
    requester = requested_by(dict(ctx.body["metadata"]))
    ctx.status.requested_by = requester
    ctx.status.phase = Phase.ISOLATING
    ctx.condition("Ready", "False", "Isolating", "isolation in progress")
    ctx.checkpoint()
    ctx.event(
        "Normal", "Admitted", f"incident {spec.incident_id} ({spec.severity}) requested by {requester}: {spec.reason}"
    )
    _audit(ctx, "isolation_applied", "admitted", reason=spec.reason)


def existing_policies(ctx: Ctx, network: NetworkIsolation) -> None:
    """Other policies still allow what they allow (policies are additive): warn, or save and remove them."""
    others = [p for p in ctx.api.list(kube.NETWORK_POLICIES, ctx.namespace) if p["metadata"]["name"] != POLICY_NAME]
    names = sorted(p["metadata"]["name"] for p in others)
    if network.override_existing_policies and others:
        save_policies(ctx, others)
        for name in names:
            ctx.api.delete(kube.NETWORK_POLICIES, ctx.namespace, name)
        ctx.status.removed_policies = sorted({*ctx.status.removed_policies, *names})
        ctx.checkpoint()
        ctx.event("Normal", "PoliciesRemoved", f"removed NetworkPolicies {', '.join(names)}; recreated on release")
        _audit(ctx, "isolation_applied", "policies_removed", policies=names)
        names = []
    if names and names != ctx.status.existing_policies:
        ctx.event("Warning", "ExistingPoliciesAllow", f"NetworkPolicies {', '.join(names)} still allow traffic")
    ctx.status.existing_policies = names
    if names:
        message = (
            f"NetworkPolicies {', '.join(names)} still allow the traffic they select (policies are additive); "
            "set spec.network.overrideExistingPolicies to remove them for the isolation"
        )
        ctx.condition("ExistingPoliciesAllow", "True", "ExistingPolicies", message)
    else:
        ctx.condition("ExistingPoliciesAllow", "False", "NoOtherPolicies", "")


def save_policies(ctx: Ctx, policies: list[dict[str, Any]]) -> None:
    """Store the manifests in status (only the operator writes it) before deleting anything: release recreates
    them from there. Only add: a manifest saved by an earlier pass is the original and is never overwritten."""
    saved = {p.name for p in ctx.status.saved_policies}
    new = [save_policy(p) for p in policies if p["metadata"]["name"] not in saved]
    if new:
        ctx.status.saved_policies = sorted([*ctx.status.saved_policies, *new], key=lambda p: p.name)
        ctx.checkpoint()


def take_snapshot(ctx: Ctx, spec: EmergencyIsolationSpec) -> list[WorkloadSnapshot]:
    """Record every workload's replicas, HPA bounds and CronJob suspend, on the workload and in status."""
    uid = str(ctx.body["metadata"]["uid"])
    workloads = _workloads(ctx.api, ctx.namespace)
    hpas = ctx.api.list(kube.HPAS, ctx.namespace)
    previous = [entry.model_copy() for entry in ctx.status.snapshot]
    entries = snapshot_workloads(
        list(workloads.values()), hpas, spec.scale_to_zero.keep_running, uid=uid, previous=previous
    )
    # Only workloads this isolation will stop carry the annotation: the others are not touched at all.
    for entry in entries if spec.scale_to_zero.enabled else []:
        workload = workloads.get((entry.kind, entry.name))
        if workload is not None and not entry.kept and recorded_snapshot(workload, uid=uid) is None:
            patch = annotate_patch(entry, isolation=ctx.name, uid=uid)
            _patch_workload(ctx.api, ctx.namespace, entry.kind, entry.name, patch)
    if [e.to_api() for e in entries] != [e.to_api() for e in ctx.status.snapshot]:
        ctx.status.snapshot = entries
        ctx.status.scaled = scaled_summary(entries, scaled=False)
        ctx.checkpoint()
        stopped = sum(1 for e in entries if not e.kept)
        ctx.event("Normal", "SnapshotRecorded", f"recorded {len(entries)} workloads ({stopped} to stop)")
        _audit(ctx, "isolation_applied", "snapshot_recorded", workloads=len(entries))
    return entries


def preserve_evidence(ctx: Ctx, spec: EmergencyIsolationSpec) -> None:
    """Capture evidence once; fail closed (no scaling) when it is required and cannot be captured."""
    if ctx.status.evidence is not None and ctx.status.evidence.key:
        return
    ctx.status.phase = Phase.CONTAINED
    ctx.checkpoint()
    try:
        record = evidence.capture(
            ctx.api,
            ctx.body,
            spec.evidence,
            requester=str(ctx.status.requested_by),
            on_collected=lambda: ctx.event("Normal", "EvidenceCollected", "evidence read; encrypting and uploading"),
        )
    except RunbookError as error:
        ctx.condition("EvidencePreserved", "False", error.reason, error.message)
        if spec.evidence.required:
            raise RunbookError(
                error.reason,
                f"{error.message} (evidence is required: nothing is scaled)",
                # Soon: a release waits for this retry (kopf finishes the pending handler first).
                retry_after=None if error.retry_after is None else EVIDENCE_RETRY,
            ) from None
        ctx.event("Warning", error.reason, f"{error.message}; continuing (evidence.required is false)")
        return
    ctx.status.evidence = record
    ctx.condition("EvidencePreserved", "True", "Uploaded", f"{record.files} files, manifest {record.manifest_key}")
    ctx.checkpoint()
    ctx.event("Normal", "EvidencePreserved", f"encrypted archive {record.key} (sha256 {record.sha256})")
    _audit(ctx, "isolation_applied", "evidence_preserved", key=record.key, sha256=record.sha256)


def scale_to_zero(ctx: Ctx, snapshot: list[WorkloadSnapshot]) -> None:
    current = _workloads(ctx.api, ctx.namespace)
    stopped = []
    for entry in snapshot:
        workload = current.get((entry.kind, entry.name))
        if entry.kept or workload is None or is_stopped(entry, workload):
            continue
        _patch_workload(ctx.api, ctx.namespace, entry.kind, entry.name, stop_patch(entry))
        stopped.append(f"{entry.kind}/{entry.name}")
    ctx.status.scaled = scaled_summary(snapshot, scaled=True)
    if not snapshot:
        ctx.condition(
            "WorkloadsStopped", "False", "NoWorkloads", "the namespace has no Deployments, StatefulSets or CronJobs"
        )
        if ctx.status.phase != Phase.ISOLATED:
            ctx.event("Warning", "NoWorkloads", "the namespace has no workloads to stop")
    else:
        ctx.condition("WorkloadsStopped", "True", "ScaledToZero", f"{len(snapshot)} workloads recorded")
    if stopped:
        ctx.event("Normal", "ScaledToZero", f"stopped {', '.join(stopped)}")
        _audit(ctx, "isolation_applied", "scaled_to_zero", workloads=stopped)


# --- release ---------------------------------------------------------------------------------------------------
def release(ctx: Ctx) -> None:
    """Restore each workload exactly (unless changed by hand), recreate the removed policies it can (those it
    cannot are a condition, never a stop), drop the deny-all policy."""
    if ctx.status.phase in (Phase.RELEASED, Phase.REJECTED):
        return
    ctx.status.phase = Phase.RELEASING
    ctx.checkpoint()
    warnings = restore_workloads(ctx)
    recreated, refused, kept = recreate_policies(ctx)
    remove_policy(ctx)
    ctx.status.saved_policies = kept  # only now: a retry after a failed removal still knows what it recreated
    ctx.status.phase = Phase.RELEASED
    ctx.status.released_at = now_rfc3339()
    ctx.status.scaled = scaled_summary(ctx.status.snapshot, scaled=False)
    if warnings:
        ctx.condition("Restored", "False", "ChangedDuringIsolation", "; ".join(warnings))
        ctx.event("Warning", "ChangedDuringIsolation", "; ".join(warnings))
    else:
        ctx.condition("Restored", "True", "Exact", "every workload is back to its recorded state")
    if refused:
        message = "NetworkPolicies not recreated (the namespace is without them): " + "; ".join(refused)
        ctx.condition("PoliciesRestored", "False", "NotRecreated", message[:1024])
        ctx.event("Warning", "PoliciesNotRestored", message[:1024])
    elif ctx.status.removed_policies:
        ctx.condition("PoliciesRestored", "True", "Recreated", f"recreated {', '.join(recreated)}")
    released = "the namespace is released" + (" (see PoliciesRestored)" if refused else "")
    ctx.condition("Ready", "True", "Released", released)
    ctx.checkpoint()
    ctx.event("Normal", "Released", f"released; recreated policies: {', '.join(recreated) or 'none'}")
    _audit(ctx, "isolation_released", "released", recreatedPolicies=recreated, notRecreated=refused, warnings=warnings)
    metrics.ISOLATIONS_ACTIVE.labels(ctx.namespace).set(0)
    spec = ctx.body.get("spec") or {}
    metrics.ISOLATION_INFO.remove(ctx.namespace, ctx.name, spec.get("incidentId", ""), spec.get("severity", "P1"))


def recreate_policies(ctx: Ctx) -> tuple[list[str], list[str], list[SavedPolicy]]:
    """Recreate each policy saved in status that passes ``checked_policy``; return the names recreated, for
    each one that is not its name and why, and the saved entries status keeps (those not recreated). The API
    server refusing one (4xx) is such a reason; an unreachable or failing server (5xx, 429) fails the pass,
    which is retried (workloads already restored stay so, policies already recreated are a 409)."""
    recreated, refused, kept = [], [], []
    for saved in ctx.status.saved_policies:
        try:
            manifest = checked_policy(saved, namespace=ctx.namespace)
            ctx.api.create(kube.NETWORK_POLICIES, ctx.namespace, manifest)  # False: recreated by an earlier pass
        except ValueError as error:
            refused.append(f"{saved.name}: the saved manifest is refused: {error}")
        except ApiException as error:
            if error.status is None or error.status >= 500 or error.status == 429:
                raise
            refused.append(f"{saved.name}: {as_failure(error).message}")
        else:
            recreated.append(saved.name)
            continue
        kept.append(saved)
    saved_names = {p.name for p in ctx.status.saved_policies}
    for name in ctx.status.removed_policies:
        if name not in saved_names:
            # Removed by an operator before issue 13, which kept the manifest in a ConfigMap any namespace
            # user could have written: it is not read (README, Upgrade notes).
            refused.append(
                f"{name}: saved by an older operator in ConfigMap {saved_policies_name(ctx.name)}, which is not "
                "trusted: review its entry and apply it by hand"
            )
    return recreated, refused, kept


def restore_workloads(ctx: Ctx) -> list[str]:
    """Each workload still carrying this isolation's annotation gets its recorded state back."""
    uid = str(ctx.body["metadata"]["uid"])
    warnings = []
    current = _workloads(ctx.api, ctx.namespace)
    for recorded in ctx.status.snapshot:
        if not recorded.kept and (recorded.kind, recorded.name) not in current:
            warnings.append(f"{recorded.kind} {recorded.name} was deleted during the isolation")
    restored = []
    for (kind, name), workload in sorted(current.items()):
        entry = recorded_snapshot(workload, uid=uid)
        if entry is None:
            continue  # not ours, kept running, or restored by an earlier pass
        untouched = is_stopped(entry, workload)
        now = workload_state(entry, workload)
        if not untouched and now != recorded_state(entry):  # (equal: never stopped, e.g. evidence failed)
            warnings.append(f"{kind} {name} was changed by hand during the isolation (now {now}); left as is")
        _patch_workload(ctx.api, ctx.namespace, kind, name, restore_patch(entry, restore_spec=untouched))
        restored.append(f"{kind}/{name}")
    if restored:
        ctx.event("Normal", "WorkloadsRestored", f"restored {', '.join(restored)}")
        _audit(ctx, "isolation_released", "workloads_restored", workloads=restored)
    return warnings


def remove_policy(ctx: Ctx) -> None:
    current = ctx.api.get(kube.NETWORK_POLICIES, ctx.namespace, POLICY_NAME)
    if current is None:
        return
    uid = ctx.body["metadata"]["uid"]
    if any(o.get("uid") == uid for o in current["metadata"].get("ownerReferences") or []):
        ctx.api.delete(kube.NETWORK_POLICIES, ctx.namespace, POLICY_NAME)
        _audit(ctx, "isolation_released", "network_released", policy=POLICY_NAME)


def time_to_contain(creation_timestamp: str, *, seen: float, contained: float) -> float:
    """Seconds from an EmergencyIsolation's creation to its NetworkPolicy being created (Unix times).

    ``creationTimestamp`` has whole seconds: the object was created somewhere in [ts, ts + 1). When the operator
    got the object within that second (``seen``: a watch delivers a new object in milliseconds), the clock
    starts at ``seen``, which leaves out only the watch's delivery and kopf's finalizer write; otherwise (the
    operator was down or busy) at ``ts``, which may count up to 1 s too much of a longer wait."""
    start = datetime.fromisoformat(creation_timestamp.replace("Z", "+00:00")).timestamp()
    if start <= seen < start + 1:
        start = seen
    return max(0.0, contained - start)


# --- the passes ------------------------------------------------------------------------------------------------
def reconcile(ctx: Ctx) -> Result:
    """Create, resume and spec changes: isolate, or release when spec.released is true."""
    seen = time.time()  # when this pass got the object: sub-second, unlike creationTimestamp
    try:
        if (ctx.body.get("spec") or {}).get("released"):
            release(ctx)
        else:
            isolate(ctx, seen=seen)
    except RunbookError as error:
        return _foreseen(ctx, error)
    return Result.done()


def finalize(ctx: Ctx) -> Result:
    """Deletion: release (the finalizer holds the object until this is done, also across operator downtime)."""
    try:
        release(ctx)
    except RunbookError as error:
        return _foreseen(ctx, error)
    return Result.done()


# --- containment first: the fast path and the guard, in runtime.CONTAINMENT -----------------------------------
# main.py runs both in containment's own executor, so neither waits behind another object's pass (snapshot,
# evidence, scaling) nor behind a slow S3 or database call that fills the shared one. The passes above stay the
# whole truth: the fast path only does earlier what ``contain`` would do, and the guard is ``contain`` again.
def awaits_containment(body: Mapping[str, Any]) -> bool:
    """Whether an EmergencyIsolation (as a watch event has it) is new and not yet contained: no phase, no
    ``isolatedAt``, neither released nor being deleted. Those are what the fast path looks at; no API call."""
    status = body.get("status") or {}
    return not (
        status.get("phase")
        or status.get("isolatedAt")
        or (body.get("spec") or {}).get("released")
        or body["metadata"].get("deletionTimestamp")
    )


def first_containment(
    body: Mapping[str, Any], *, isolation: Isolation, grants: GrantsOf, api: kube.Api
) -> tuple[Ctx, dict[str, Any]] | None:
    """A new isolation's deny-all policy to create before its first pass, after the same checks (a valid spec,
    the tenancy rules, the interlock), with no API call; None when it is the pass's (an invalid spec or a
    tenancy refusal, which the pass reports; network.isolate false; another isolation holds the namespace)."""
    if not awaits_containment(body):
        return None
    ctx = Context.of(ISOLATION, body, api, isolation=isolation, grants=grants)
    try:
        spec = ctx.spec
        tenancy.confine_emergency_isolation(ctx.grants(ctx.namespace), ctx.namespace, spec)
    except RunbookError:
        return None
    if not spec.network.isolate or ctx.isolation(ctx.namespace) not in (None, ctx.name):
        return None
    return ctx, _desired_policy(ctx, spec.network)


def contain_first(
    api: kube.Api, body: Mapping[str, Any], *, isolation: Isolation, grants: GrantsOf, seen: float
) -> bool:
    """``first_containment``'s policy, then one create (a new isolation's namespace has no emergency-isolate; if
    it has one, a 409 leaves it to the pass, which adopts a hand-made one or waits for another isolation's).
    Returns whether it created the policy (then ``record_first_containment``); a failure is the pass's to
    report. Blocking: the unit specification's seam; the operator begins it with ``begin_containment``, which
    makes the same create on the event loop."""
    first = first_containment(body, isolation=isolation, grants=grants, api=api)
    return first is not None and _create(api, *first, seen)


def record_first_containment(api: kube.Api, body: Mapping[str, Any]) -> None:
    """After ``contain_first`` created the policy: ``isolatedAt`` (alone), the Event, the audit record. (If this
    never happens, the pass records ``isolatedAt`` from the policy.)"""
    ctx = Context.of(ISOLATION, body, api, isolation=lambda _: None, grants=lambda _: ())
    try:
        _record_contained(ctx, write=True)
    except ApiException as error:
        LOG.warning("%s %s/%s: isolatedAt left to the pass: %s", KIND, ctx.namespace, ctx.name, as_failure(error))


class _InFlight:
    """How many first containments are under way, and since when none (in-memory coordination only): the passes
    of isolations wait until none has been for a moment (``settled``), so that a burst of them does not load the
    API server ahead of the creates still arriving."""

    def __init__(self) -> None:
        self.count = 0
        self.idle_since = 0.0  # time.monotonic() when the last one ended
        self.idle = asyncio.Event()
        self.idle.set()

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        self.count += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if not self.count:
                self.idle_since = time.monotonic()
                self.idle.set()


CONTAINING = _InFlight()
SETTLE_QUIET = 0.25  # seconds without a first containment under way: the burst is over
SETTLE_AT_MOST = 2.0  # seconds a pass waits for the containments under way; never longer (no starvation)


async def contain_new(
    body: Mapping[str, Any], *, isolation: Isolation, grants: GrantsOf, api: kube.Api | None = None
) -> None:
    """main.py's fast path for an isolation's kopf event: its first containment (``begin_containment``), or the
    one the containment watch (reconcilers/containment.py) began first, waited for; nothing twice."""
    started = begin_containment(body, isolation=isolation, grants=grants, api=api)
    if started is not None:
        await asyncio.shield(started)  # kopf cancelling its handler does not cancel the watch's containment


# uid -> the first containment of that isolation, by whichever came first of kopf's event and the containment
# watch: the other one finds it here and waits for it (one create per isolation and process). Kept until kopf's
# events of that isolation no longer await containment (``forget_containment``) or it is deleted.
_FIRST: dict[str, asyncio.Future[bool]] = {}


def begin_containment(
    body: Mapping[str, Any], *, isolation: Isolation, grants: GrantsOf, api: kube.Api | None = None
) -> asyncio.Future[bool] | None:
    """A new isolation's first containment (``first_containment``'s checks, then the create on the event loop,
    or ``contain_first``'s in CONTAINMENT when ``api`` is given; then ``record_first_containment`` once the
    creates of other isolations are done), begun now as a task; the one already begun for that uid; or None
    when the checks leave it to the pass (nothing is remembered: a later look, with fuller indexes, may begin
    it). Its result: whether it created the policy (a 409 or a failure: False, the pass's)."""
    uid = str(body["metadata"].get("uid"))
    if uid in _FIRST:
        return _FIRST[uid]
    first = first_containment(body, isolation=isolation, grants=grants, api=api or kube.KubeApi())
    if first is None:
        return None
    started = asyncio.ensure_future(_first_containment(*first, body, api=api, seen=time.time()))
    started.add_done_callback(_log_failure)
    _FIRST[uid] = started
    return started


def forget_containment(uid: str) -> None:
    """kopf saw the isolation no longer await containment (or deleted): its entry in ``_FIRST`` goes."""
    _FIRST.pop(uid, None)


def _log_failure(started: asyncio.Future[bool]) -> None:
    if not started.cancelled() and started.exception() is not None:
        LOG.error("%s: first containment failed", KIND, exc_info=started.exception())


async def _first_containment(
    ctx: Ctx, policy: dict[str, Any], body: Mapping[str, Any], *, api: kube.Api | None, seen: float
) -> bool:
    with CONTAINING.one():
        if api is None:
            created = await _create_on_loop(await loop_client(), ctx, policy, seen=seen)
        else:
            created = await blocking(_create, api, ctx, policy, seen, executor=CONTAINMENT)
    if created:
        await containment_settled()  # the other creates first
        await blocking(record_first_containment, api or kube.KubeApi(), body, executor=CONTAINMENT)
    return created


def _create(api: kube.Api, ctx: Ctx, policy: dict[str, Any], seen: float) -> bool:
    try:
        if not api.create(kube.NETWORK_POLICIES, ctx.namespace, policy):
            return False
    except ApiException as error:
        LOG.warning("%s %s/%s: containment left to the pass: %s", KIND, ctx.namespace, ctx.name, as_failure(error))
        return False
    _contained(ctx, seen=seen)
    return True


async def _create_on_loop(client: kube.LoopCreate, ctx: Ctx, policy: dict[str, Any], *, seen: float) -> bool:
    try:
        payload = json.dumps(policy).encode()
        if not await client.create(kube.NETWORK_POLICIES, ctx.namespace, payload, executor=CONTAINMENT):
            return False
    except (ApiException, aiohttp.ClientError, TimeoutError) as error:
        LOG.warning("%s %s/%s: containment left to the pass: %s", KIND, ctx.namespace, ctx.name, as_failure(error))
        return False
    _contained(ctx, seen=seen)
    return True


_LOOP_CLIENT: list[tuple[asyncio.AbstractEventLoop, kube.LoopCreate]] = []  # the running loop's, once made


async def loop_client() -> kube.LoopCreate:
    """The running event loop's ``kube.LoopCreate``, made (it reads the TLS files) and its auth header read in
    CONTAINMENT on first use: main.py's startup calls this, so that no burst waits for it."""
    loop = asyncio.get_running_loop()
    if _LOOP_CLIENT and _LOOP_CLIENT[0][0] is loop:
        return _LOOP_CLIENT[0][1]
    client = await blocking(kube.LoopCreate, kube.api_client(), executor=CONTAINMENT)
    await blocking(client.read_auth, executor=CONTAINMENT)
    if not (_LOOP_CLIENT and _LOOP_CLIENT[0][0] is loop):  # another caller may have made one meanwhile
        _LOOP_CLIENT[:] = [(loop, client)]
    return _LOOP_CLIENT[0][1]


async def close_loop_client(timeout: float = kube.REQUEST_TIMEOUT[0]) -> None:
    """At shutdown: the first containments under way end (at most ``timeout`` seconds), then the connections
    close."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(CONTAINING.idle.wait(), timeout)
    if _LOOP_CLIENT:
        await _LOOP_CLIENT.pop()[1].close()


async def containment_settled() -> None:
    """Before an isolation's pass: until no first containment has been under way for SETTLE_QUIET, or
    SETTLE_AT_MOST."""
    deadline = time.monotonic() + SETTLE_AT_MOST
    while (remaining := deadline - time.monotonic()) > 0:
        if CONTAINING.count:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(CONTAINING.idle.wait(), remaining)
            continue
        quiet = time.monotonic() - CONTAINING.idle_since
        if quiet >= SETTLE_QUIET:
            return
        await asyncio.sleep(min(SETTLE_QUIET - quiet, remaining))


def guard_entry(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the guard keeps of an EmergencyIsolation (main.py's index ``isolation_guards``): its name, uid and
    the spec of the policy it holds in place; ``policy`` None while it holds none (not isolated yet, released,
    being deleted, network.isolate false, an invalid spec)."""
    metadata = body["metadata"]
    entry: dict[str, Any] = {"name": metadata["name"], "uid": metadata.get("uid"), "policy": None}
    status, spec = body.get("status") or {}, body.get("spec") or {}
    if status.get("phase") != Phase.ISOLATED or spec.get("released") or metadata.get("deletionTimestamp"):
        return entry
    try:
        network = parse_spec(EmergencyIsolationSpec, spec).network
    except RunbookError:
        return entry
    if network.isolate:
        entry["policy"] = deny_all_spec(network)
    return entry


def guarded_isolation(
    event_type: str | None, policy: Mapping[str, Any], entries: Iterable[Mapping[str, Any]]
) -> str | None:
    """For a watch event of an emergency-isolate policy (the operator's, by its label): the EmergencyIsolation
    (of ``entries``, the namespace's ``guard_entry`` values) that must put it back, because it holds this
    policy in place and the policy is gone or its spec is not the one it holds; None, with no API call, when
    nothing changed (the events of the operator's own writes included)."""
    metadata = policy["metadata"]
    if metadata.get("name") != POLICY_NAME:
        return None
    owners = {o.get("uid") for o in metadata.get("ownerReferences") or [] if o.get("kind") == KIND}
    for entry in entries:
        held = entry.get("policy")
        if entry.get("uid") in owners and held is not None and (event_type == "DELETED" or policy.get("spec") != held):
            return str(entry["name"])
    return None


def guard(ctx: Ctx) -> Result:
    """While isolated: put the deny-all policy back if someone removed or changed it (a read, and no write
    while it is as it should be)."""
    spec = ctx.body.get("spec") or {}
    if ctx.status.phase != Phase.ISOLATED or spec.get("released"):
        return Result.done()
    try:
        network = ctx.spec.network
        if network.isolate and contain(ctx, network):
            # The guard runs beside the change handlers: if a release began meanwhile, it may already have
            # removed the policy this just wrote. Release marks itself before removing, so checking after
            # writing closes the race.
            fresh = ctx.api.get(EMERGENCY_ISOLATIONS, ctx.namespace, ctx.name) or {
                "metadata": {"deletionTimestamp": "gone"}
            }
            if (
                (fresh.get("status") or {}).get("phase") != Phase.ISOLATED
                or (fresh.get("spec") or {}).get("released")
                or fresh["metadata"].get("deletionTimestamp")
            ):
                remove_policy(ctx)
    except RunbookError as error:
        return _foreseen(ctx, error)
    return Result.done()


def guard_named(api: kube.Api, namespace: str, name: str, grants: GrantsOf, failures: int = 0) -> Result:
    """One guard pass over the isolation as it is now; nothing when it is gone or being deleted."""
    body = api.get(EMERGENCY_ISOLATIONS, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Result.done()
    return run_pass(Context.of(GUARD, body, api, grants=grants), guard, failures=failures)


async def put_back(namespace: str, name: str, *, grants: GrantsOf, api: kube.Api | None = None) -> None:
    """The guard (``guard_named``, in CONTAINMENT) until it has held: a failed pass again after its backoff."""
    client = api or kube.KubeApi()
    failures = 0
    while True:
        result = await blocking(guard_named, client, namespace, name, grants, failures, executor=CONTAINMENT)
        if result.requeue_after is None:
            return
        failures = failures + 1 if result.error is not None else 0
        await asyncio.sleep(result.requeue_after)


ISOLATION = Reconciler(EMERGENCY_ISOLATIONS, EmergencyIsolationSpec, EmergencyIsolationStatus, reconcile, finalize)
GUARD = dataclasses.replace(ISOLATION, reconcile=guard, finalize=None)
