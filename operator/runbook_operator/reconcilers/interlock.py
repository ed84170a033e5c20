"""Asks whether a namespace is under an active EmergencyIsolation: rotation and scaling pause while it is."""

from __future__ import annotations

from ..clients import kube
from ..models import GROUP, VERSION
from ..models.isolation import holding_isolation


def active_isolation(namespace: str) -> str | None:
    """The name of the EmergencyIsolation that holds the namespace (``models.isolation.holding_isolation``),
    or None."""
    listing = kube.custom().list_namespaced_custom_object(GROUP, VERSION, namespace, "emergencyisolations")
    holder = holding_isolation(listing.get("items", []))
    return None if holder is None else str(holder["metadata"]["name"])
