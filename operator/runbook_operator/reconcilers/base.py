"""What every reconciler shares: parsing specs into models, writing status only when it changes,
reporting failures as conditions and Events."""

from __future__ import annotations

from typing import Any, TypeVar

import kopf
from pydantic import BaseModel, ValidationError

from ..conditions import ConditionStatus, set_condition
from ..errors import RunbookError

M = TypeVar("M", bound=BaseModel)


def describe_validation_error(error: ValidationError, root: str = "spec") -> str:
    """The first problem as one line naming the field, e.g. ``spec.retention.maxAge: ...``."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in (root, *first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    return f"{location}: {message}"


def parse_spec(model: type[M], spec: Any) -> M:
    """The spec as its model, or a ``RunbookError(InvalidSpec)`` naming the field."""
    try:
        return model.model_validate(dict(spec or {}))
    except ValidationError as error:
        raise RunbookError("InvalidSpec", describe_validation_error(error)) from None


class StatusPatch:
    """Collects status changes against the current status; ``apply`` writes only what differs."""

    def __init__(self, status: Any, generation: int | None) -> None:
        self.current: dict[str, Any] = dict(status or {})
        self.generation = generation
        self.changes: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.changes.get(key, self.current.get(key, default))

    def set(self, **fields: Any) -> None:
        for key, value in fields.items():
            if self.current.get(key) != value or key in self.changes:
                self.changes[key] = value

    def condition(self, type: str, status: ConditionStatus, reason: str, message: str = "") -> None:
        conditions = set_condition(
            self.get("conditions"),
            type=type,
            status=status,
            reason=reason,
            message=message,
            generation=self.generation,
        )
        self.set(conditions=conditions)

    def apply(self, patch: kopf.Patch) -> None:
        if self.generation is not None:
            self.set(observedGeneration=self.generation)
        for key, value in self.changes.items():
            patch.status[key] = value


def report_failure(body: kopf.Body, status: StatusPatch, error: RunbookError, *, phase: str | None = None) -> None:
    """Ready=False with the error's reason and message, and a Warning Event."""
    status.condition("Ready", "False", error.reason, error.message)
    if phase is not None:
        status.set(phase=phase)
    kopf.warn(body, reason=error.reason, message=error.message)


def retry_or_stop(error: RunbookError) -> kopf.TemporaryError | kopf.PermanentError:
    """The kopf error that retries later (a dependency may appear) or waits for a spec change."""
    if error.retry_after is not None:
        return kopf.TemporaryError(error.message, delay=error.retry_after)
    return kopf.PermanentError(error.message)
