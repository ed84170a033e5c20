"""Asks whether a namespace is under an active EmergencyIsolation: rotation and scaling pause while it is."""

from __future__ import annotations

from typing import Any

from ..clients import kube
from ..models import GROUP, VERSION

# Phases of an EmergencyIsolation that hold nothing: released, refused (a second one), or never acted on.
INACTIVE_PHASES = {"Released", "Rejected", "Invalid"}


def _is_active(item: dict[str, Any]) -> bool:
    released = item.get("spec", {}).get("released", False)
    phase = item.get("status", {}).get("phase")
    return not released and phase not in INACTIVE_PHASES and not item["metadata"].get("deletionTimestamp")


def active_isolation(namespace: str) -> str | None:
    """The name of the EmergencyIsolation that holds the namespace, or None.

    Of several active ones, the one that has already acted holds it, else the oldest (ties by name), so
    that two created at the same moment agree on which of them proceeds.
    """
    listing = kube.custom().list_namespaced_custom_object(GROUP, VERSION, namespace, "emergencyisolations")
    active = [item for item in listing.get("items", []) if _is_active(item)]
    if not active:
        return None
    holder = min(
        active,
        key=lambda item: (
            item.get("status", {}).get("phase") is None,
            item["metadata"].get("creationTimestamp", ""),
            item["metadata"]["name"],
        ),
    )
    return str(holder["metadata"]["name"])
