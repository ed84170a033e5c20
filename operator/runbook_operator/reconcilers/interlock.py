"""Asks whether a namespace is under an active EmergencyIsolation: rotation and scaling pause while it is."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..models.isolation import holding_isolation


def index_entry(body: Mapping[str, Any]) -> dict[str, Any]:
    """What ``holding_isolation`` reads of an EmergencyIsolation: the value main.py's kopf index keeps."""
    metadata = body["metadata"]
    entry: dict[str, Any] = {
        "metadata": {
            "name": metadata["name"],
            "creationTimestamp": metadata.get("creationTimestamp", ""),
            "deletionTimestamp": metadata.get("deletionTimestamp"),
        },
        "spec": {"released": (body.get("spec") or {}).get("released", False)},
        "status": {"phase": (body.get("status") or {}).get("phase")},
    }
    return entry


def holder_from_index(index: Mapping[str, Iterable[Mapping[str, Any]]]) -> Callable[[str], str | None]:
    """``Context.isolation`` (``runtime.drive(..., isolation=...)``) answered from kopf's index
    ``isolations_by_namespace`` (namespace -> ``index_entry`` of each EmergencyIsolation): no API call."""

    def holder(namespace: str) -> str | None:
        found = holding_isolation(index.get(namespace, ()))
        return None if found is None else str(found["metadata"]["name"])

    return holder
