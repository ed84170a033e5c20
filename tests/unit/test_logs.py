"""Registered secret values never reach a log handler."""

from __future__ import annotations

import logging

import pytest

from runbook_operator.logs import SecretRedactor


def test_redactor_scrubs_messages_args_and_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    earlier = SecretRedactor()  # another redactor (e.g. on an earlier handler) has seen the record first
    earlier.register("unrelated-secret")
    redactor = SecretRedactor()
    redactor.register("s3cr3t-value-123")
    redactor.register(b"another-secret")
    redactor.register("ab")  # too short to redact safely
    logger = logging.getLogger("test.redactor")
    caplog.handler.addFilter(earlier)
    caplog.handler.addFilter(redactor)
    try:
        logger.warning("password is %s", "s3cr3t-value-123")
        try:
            raise RuntimeError("failed with another-secret")
        except RuntimeError:
            logger.exception("boom")
    finally:
        caplog.handler.removeFilter(redactor)
        caplog.handler.removeFilter(earlier)
    text = caplog.text
    assert "s3cr3t-value-123" not in text and "another-secret" not in text
    assert "password is [REDACTED]" in text and "RuntimeError: failed with [REDACTED]" in text
