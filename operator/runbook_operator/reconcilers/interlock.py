"""Asks whether a namespace is under an active EmergencyIsolation: rotation and scaling pause while it is."""

from __future__ import annotations

from ..clients import kube
from ..models import GROUP, VERSION

INACTIVE_PHASES = {"Released", "Rejected"}


def active_isolation(namespace: str) -> str | None:
    """The name of the namespace's active EmergencyIsolation, or None."""
    listing = kube.custom().list_namespaced_custom_object(GROUP, VERSION, namespace, "emergencyisolations")
    for item in listing.get("items", []):
        released = item.get("spec", {}).get("released", False)
        phase = item.get("status", {}).get("phase")
        if not released and phase not in INACTIVE_PHASES and not item["metadata"].get("deletionTimestamp"):
            return str(item["metadata"]["name"])
    return None
