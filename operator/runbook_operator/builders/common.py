"""Pieces every builder uses. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def owner_reference(body: Mapping[str, Any], *, block_owner_deletion: bool = True) -> dict[str, Any]:
    """The controller owner reference to one of our resources: garbage collection deletes the child with it.
    ``block_owner_deletion=False`` where a finalizer of ours already holds the owner."""
    metadata = body["metadata"]
    reference = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
    }
    if block_owner_deletion:
        reference["blockOwnerDeletion"] = True
    return reference


def contains(current: Any, desired: Any) -> bool:
    """Whether ``current`` has every value of ``desired`` (the API server may add defaulted fields)."""
    if isinstance(desired, dict):
        return isinstance(current, dict) and all(contains(current.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(current, list)
            and len(current) == len(desired)
            and all(contains(c, d) for c, d in zip(current, desired, strict=True))
        )
    return bool(current == desired)
