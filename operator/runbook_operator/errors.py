"""The one error type reconcilers show to users."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class RunbookError(Exception):
    """Bad input or a missing dependency, reported as ``Ready=False`` with ``reason`` and a one-line message.

    The message names the field or object at fault and never contains a secret value.
    ``retry_after`` (seconds) asks for another attempt later (a Secret that may appear); None waits for the
    user to change the resource.
    """

    def __init__(self, reason: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


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
