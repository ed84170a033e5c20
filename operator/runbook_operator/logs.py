"""Structured logging: secret redaction for every record, and JSON audit lines.

The operator never formats a secret into a message. As a second line of defence, every secret value a
client reads is registered here, and a filter on the root logger replaces it wherever it appears before any
handler (stderr, kopf's Event poster) sees the record.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from .conditions import now_rfc3339

AUDIT = logging.getLogger("runbook.audit")
_REDACTED = "[REDACTED]"
_MIN_SECRET_LENGTH = 6  # shorter values would redact ordinary words


class SecretRedactor(logging.Filter):
    """Replaces registered secret values in log messages and arguments."""

    def __init__(self) -> None:
        super().__init__()
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def register(self, value: str | bytes | None) -> None:
        if value is None:
            return
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if len(text) >= _MIN_SECRET_LENGTH:
            with self._lock:
                self._values.add(text)

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, _REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._values:
            record.msg = self.scrub(record.getMessage())
            record.args = None
            # The traceback becomes text once, so that every later filter and handler sees the scrubbed text.
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            if record.exc_text:
                record.exc_text = self.scrub(record.exc_text)
        return True


REDACTOR = SecretRedactor()


def install_redactor() -> None:
    """Attach the redactor to every handler of the root logger (filters on loggers do not propagate)."""
    for handler in logging.getLogger().handlers:
        if REDACTOR not in handler.filters:
            handler.addFilter(REDACTOR)
    logging.getLogger().addFilter(REDACTOR)


def audit(event: str, *, namespace: str, name: str, kind: str, **fields: Any) -> None:
    """One JSON audit line (``compliance: hipaa``) for a security-relevant action."""
    record = {
        "time": now_rfc3339(),
        "event": event,
        "compliance": "hipaa",
        "kind": kind,
        "namespace": namespace,
        "name": name,
        **fields,
    }
    AUDIT.info(json.dumps(record, sort_keys=True, default=str))
