"""The one error type reconcilers show to users."""

from __future__ import annotations


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
