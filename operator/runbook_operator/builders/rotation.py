"""SecretRotation: the pending Secret, the writes to the rotated Secret and the restart targets, the schedule.

Pure functions of the spec, the values and an explicit ``now``; no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import zoneinfo
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from croniter import croniter

from ..models.common import parse_duration
from ..models.rotation import SecretRotationSpec
from ..settings import MANAGED_BY, PREFIX
from .common import owner_reference

ROTATION_ID = f"{PREFIX}/rotation-id"  # on the pending Secret and on restarted pod templates
ROTATED_BY = f"{PREFIX}/rotated-by"  # on the rotated Secret: the one SecretRotation that writes it
# The Secret types a rotation writes a password into; the others hold what a password must not replace
# (TLS keys, ServiceAccount or bootstrap tokens, registry credentials, SSH keys, Helm releases, ...).
ROTATABLE_TYPES = ("Opaque", "kubernetes.io/basic-auth")
OWNER_LABEL = f"{PREFIX}/secretrotation"
PENDING_PASSWORD = "password"
PENDING_USERNAME = "username"
_PENDING_SUFFIX = "-rotation-pending"


def fingerprint(value: str) -> str:
    """A short hash that tells values apart in status and audit lines without revealing them."""
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def encode(value: str) -> str:
    """A Secret ``data`` value."""
    return base64.b64encode(value.encode()).decode()


def pending_secret_name(name: str) -> str:
    """The operator-owned Secret that holds a rotation's new value until it is published (<= 253 chars)."""
    return name[: 253 - len(_PENDING_SUFFIX)] + _PENDING_SUFFIX


def build_pending_secret(
    owner: Mapping[str, Any], *, rotation_id: str, password: str, username: str | None
) -> dict[str, Any]:
    """The pending Secret of one rotation, owned by the SecretRotation (garbage-collected with it)."""
    data = {PENDING_PASSWORD: encode(password)}
    if username is not None:
        data[PENDING_USERNAME] = encode(username)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": pending_secret_name(owner["metadata"]["name"]),
            "namespace": owner["metadata"]["namespace"],
            "labels": {**MANAGED_BY, OWNER_LABEL: owner["metadata"]["name"]},
            "annotations": {ROTATION_ID: rotation_id},
            "ownerReferences": [owner_reference(owner, block_owner_deletion=False)],
        },
        "type": "Opaque",
        "data": data,
    }


def refill_pending_secret(*, rotation_id: str, password: str, username: str | None) -> dict[str, Any]:
    """A merge patch that turns an older rotation's pending Secret (of the same owner) into this one's."""
    return {
        "metadata": {"annotations": {ROTATION_ID: rotation_id}},
        "data": {PENDING_PASSWORD: encode(password), PENDING_USERNAME: None if username is None else encode(username)},
    }


def rotated_secret_refusal(
    spec: SecretRotationSpec, secret: Mapping[str, Any], *, owner: Mapping[str, Any]
) -> str | None:
    """Why the SecretRotation ``owner`` must not write ``secret`` (its ``spec.secretRef``), or None: a type
    other than ``ROTATABLE_TYPES``, owned by another object, managed by another SecretRotation
    (``ROTATED_BY``), or the target's admin Secret."""
    metadata = secret.get("metadata") or {}
    kind = secret.get("type") or "Opaque"
    if kind not in ROTATABLE_TYPES:
        return f"its type is {kind}; a rotation writes only a Secret of type {' or '.join(ROTATABLE_TYPES)}"
    uid = owner["metadata"].get("uid")
    for ref in metadata.get("ownerReferences") or []:
        if ref.get("uid") != uid:
            return f"it is owned by {ref.get('kind')} {ref.get('name')} (ownerReferences), which manages it"
    managed_by = (metadata.get("annotations") or {}).get(ROTATED_BY)
    if managed_by not in (None, owner["metadata"]["name"]):
        return f"SecretRotation {managed_by} rotates it already (annotation {ROTATED_BY})"
    target = (spec.target.postgresql or spec.target.redis) if spec.target is not None else None
    if target is not None and target.admin_secret_ref.name == spec.secret_ref.name:
        return "it is the target's adminSecretRef, the login that rotates"
    return None


def claim_patch(name: str | None) -> dict[str, Any]:
    """Marks the rotated Secret as written by SecretRotation ``name`` (None: no longer)."""
    return {"metadata": {"annotations": {ROTATED_BY: name}}}


def publish_patch(spec: SecretRotationSpec, *, password: str, username: str | None) -> dict[str, Any]:
    """A merge patch writing the password (and, in dual strategy, the user name) in one write.

    Only these keys are named, so the Secret's other keys are never touched.
    """
    data = {spec.secret_ref.key: encode(password)}
    if username is not None and spec.secret_ref.username_key is not None:
        data[spec.secret_ref.username_key] = encode(username)
    return {"data": data}


def restart_patch(rotation_id: str) -> dict[str, Any]:
    """Stamps the rotation on a workload's pod template: its controller rolls new pods that read the Secret."""
    return {"spec": {"template": {"metadata": {"annotations": {ROTATION_ID: rotation_id}}}}}


def dual_roles(group: str) -> tuple[str, str]:
    """The two login roles of the dual strategy, members of the NOLOGIN group role ``group``."""
    return f"{group}_a", f"{group}_b"


def idle_role(group: str, active: str | None) -> str:
    """The dual login role not named in the Secret: the one whose password may change now."""
    first, second = dual_roles(group)
    return second if active == first else first


def next_rotation(spec: SecretRotationSpec, *, last: datetime | None, created: datetime) -> datetime | None:
    """When the next scheduled rotation is due (None: only ``rotateNow`` rotates).

    Counted from the last rotation, or from the resource's creation before the first one: creating a
    SecretRotation never changes a password by itself unless ``rotateNow`` is set.
    """
    since = last or created
    if spec.interval is not None:
        return since + parse_duration(spec.interval)
    if spec.schedule is not None:
        local = since.astimezone(zoneinfo.ZoneInfo(spec.time_zone))
        upcoming: datetime = croniter(spec.schedule, local).get_next(datetime)
        return upcoming.astimezone(UTC)
    return None


def rollout_pending(kind: str, workload: Mapping[str, Any]) -> str | None:
    """Why a workload's rollout is not finished yet (None when it is), as ``kubectl rollout status`` judges."""
    meta, spec, status = workload.get("metadata", {}), workload.get("spec", {}), workload.get("status") or {}
    if status.get("observedGeneration", 0) < meta.get("generation", 0):
        return "waiting for the controller to observe the new template"
    replicas = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    if kind == "StatefulSet" and spec.get("updateStrategy", {}).get("type") == "OnDelete":
        return "updateStrategy OnDelete: pods are only replaced when deleted"
    if updated < replicas:
        return f"{updated} of {replicas} replicas updated"
    if kind == "Deployment":
        if status.get("replicas", 0) > updated:
            return f"{status['replicas'] - updated} old replicas pending termination"
        available = status.get("availableReplicas", 0)
        if available < updated:
            return f"{available} of {updated} updated replicas available"
        return None
    ready = status.get("readyReplicas", 0)
    if ready < replicas:
        return f"{ready} of {replicas} replicas ready"
    if status.get("currentRevision") != status.get("updateRevision"):
        return "waiting for the rolling update to complete"
    return None
