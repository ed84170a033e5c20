"""Standard Kubernetes conditions with correct ``lastTransitionTime`` semantics."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from .models.common import rfc3339

ConditionStatus = Literal["True", "False", "Unknown"]

# BackupPolicy spec.wal (reconcilers/wal.py): whether WAL is being archived (the receiver on its slot, WAL
# reaching the bucket) and whether a point-in-time restore has a window to recover into.
WAL_ARCHIVING = "WALArchiving"
RECOVERY_WINDOW = "RecoveryWindow"


def now_rfc3339() -> str:
    """The current UTC time as Kubernetes writes it (second precision, Z)."""
    return rfc3339(datetime.now(UTC))


def set_condition(
    conditions: list[dict[str, Any]] | None,
    *,
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    generation: int | None = None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Return a new list with ``type`` set; ``lastTransitionTime`` moves only when ``status`` changes."""
    existing = {c["type"]: c for c in conditions or []}
    previous = existing.get(type)
    transition = previous["lastTransitionTime"] if previous and previous["status"] == status else None
    condition: dict[str, Any] = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message[:1024],
        "lastTransitionTime": transition or now or now_rfc3339(),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    existing[type] = condition
    return list(existing.values())


def get_condition(conditions: list[dict[str, Any]] | None, type: str) -> dict[str, Any] | None:
    """The condition of that type, if present."""
    return next((c for c in conditions or [] if c.get("type") == type), None)


def is_true(conditions: list[dict[str, Any]] | None, type: str) -> bool:
    """Whether the condition of that type has status True."""
    condition = get_condition(conditions, type)
    return condition is not None and condition.get("status") == "True"
