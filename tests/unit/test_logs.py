"""No secret reaches a log handler: registered values in every encoding, and anything shaped like a Secret."""

from __future__ import annotations

import base64
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Iterator

import kopf
import pytest

from runbook_operator import logs
from runbook_operator.logs import REDACTOR, SecretRedactor, install_redactor, redact_secret_objects

SECRET = "p@ss w/rd+é\"'\\&=?~%-1234"  # every encoding below writes it differently


@pytest.fixture
def capture(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., str]]:
    """Log through a fresh redactor that knows SECRET; returns the captured text."""
    redactor = SecretRedactor()
    redactor.register(SECRET)
    caplog.handler.addFilter(redactor)
    caplog.set_level(logging.DEBUG)
    logger = logging.getLogger("test.redactor")

    def log(message: str, *args: object) -> str:
        caplog.clear()
        logger.debug(message, *args)
        return caplog.text

    try:
        yield log
    finally:
        caplog.handler.removeFilter(redactor)


@pytest.fixture
def installed() -> Iterator[None]:
    """install_redactor() for one test; the global logging state is put back afterwards."""
    factory = logging.getLogRecordFactory()
    levels = {name: logging.getLogger(name).level for name in logs.WIRE_LOGGERS}
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        logging.setLogRecordFactory(factory)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        root.setLevel(root_level)
        root.handlers[:] = root_handlers
        root.removeFilter(REDACTOR)


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


ENCODINGS: dict[str, Callable[[str], str]] = {
    "plain": lambda v: v,
    "base64": lambda v: base64.b64encode(v.encode()).decode(),
    "base64 unpadded": lambda v: base64.b64encode(v.encode()).decode().rstrip("="),
    "urlsafe base64": lambda v: base64.urlsafe_b64encode(v.encode()).decode(),
    "quote": lambda v: urllib.parse.quote(v, safe=""),
    "quote (default safe)": urllib.parse.quote,
    "quote lower-case hex": lambda v: re.sub(
        "%[0-9A-F]{2}", lambda m: m.group().lower(), urllib.parse.quote(v, safe="")
    ),
    "quote_plus": urllib.parse.quote_plus,
    "json": lambda v: json.dumps(v)[1:-1],
    "json non-ASCII kept": lambda v: json.dumps(v, ensure_ascii=False)[1:-1],
    "json in json": lambda v: json.dumps(json.dumps(v)[1:-1])[1:-1],
    "repr": lambda v: repr(v)[1:-1],
    "bytes repr": lambda v: repr(v.encode())[2:-1],
    "json body as bytes": lambda v: repr(json.dumps(v).encode())[3:-2],
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_of_a_registered_value_is_redacted(encoding: str, capture: Callable[..., str]) -> None:
    encoded = ENCODINGS[encoding](SECRET)
    text = capture("value: %s end", encoded)
    assert encoded not in text and "value: [REDACTED] end" in text


@pytest.mark.parametrize("prefix", [b"", b"x", b"xy", b"xyz", b"0123456789"])
def test_base64_of_a_value_inside_a_larger_blob_is_redacted_at_every_alignment(
    prefix: bytes, capture: Callable[..., str]
) -> None:
    blob = base64.b64encode(prefix + SECRET.encode() + b" and more after it")
    assert base64.b64encode(SECRET.encode()).decode().rstrip("=") not in blob.decode()  # not simply the whole
    text = capture("blob %s", blob.decode())
    assert "[REDACTED]" in text
    # No 12 characters of the value's base64 at this alignment survive.
    skip = (3 - len(prefix) % 3) % 3
    core = base64.b64encode(SECRET.encode()[skip : skip + 9]).decode()
    assert core in blob.decode() and core not in text


def test_each_line_of_a_multi_line_secret_is_redacted(capture: Callable[..., str]) -> None:
    redactor = SecretRedactor()
    key = (
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBGZabcdefghijklmnop\nqrstuvwxyz0123456789AB\n"
        "-----END PGP PRIVATE KEY BLOCK-----\n"
    )
    redactor.register(key)
    assert redactor.scrub("line 2 is qrstuvwxyz0123456789AB") == "line 2 is [REDACTED]"
    assert redactor.scrub("-----BEGIN PGP PRIVATE KEY BLOCK-----") == "-----BEGIN PGP PRIVATE KEY BLOCK-----"


def test_a_value_with_a_trailing_newline_is_redacted_without_it() -> None:
    redactor = SecretRedactor()
    redactor.register("from-a-file-1234\n")
    assert redactor.scrub("password from-a-file-1234 used") == "password [REDACTED] used"


def _secret(data: dict[str, str], **metadata: object) -> dict[str, object]:
    return {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {"name": "db", **metadata},
        "data": data,
        "type": "Opaque",
    }


UNREGISTERED = base64.b64encode(b"never-registered-value").decode()


def test_kubernetes_client_response_body_of_an_unregistered_secret_is_redacted(capture: Callable[..., str]) -> None:
    """What kubernetes.client.rest logs at DEBUG before read_secret_value could register anything."""
    applied = json.dumps(_secret({"password": UNREGISTERED}), separators=(",", ":"))
    body = _secret(
        {"password": UNREGISTERED, "username": "cmVhZGVy"},
        annotations={"kubectl.kubernetes.io/last-applied-configuration": applied},
    )
    text = capture("response body: %s", json.dumps(body, separators=(",", ":")).encode())
    assert UNREGISTERED not in text and "cmVhZGVy" not in text
    assert '"password":"[REDACTED]"' in text and '\\\\"password\\\\":\\\\"[REDACTED]\\\\"' in text
    assert '"name":"db"' in text  # the rest of the body is kept


@pytest.mark.parametrize(
    "shape",
    [
        "list",
        "watch event",
        "repr of a dict",
        "json with spaces",
        "yaml",
        "stringData with braces",
    ],
)
def test_secret_shapes_are_redacted_without_registration(shape: str) -> None:
    value = "never-registered-value"
    text = {
        "list": json.dumps({"kind": "SecretList", "items": [{"metadata": {"name": "a"}, "data": {"k": UNREGISTERED}}]}),
        "watch event": json.dumps({"type": "ADDED", "object": _secret({"k": UNREGISTERED})}),
        "repr of a dict": repr({"kind": "Secret", "data": {"k": UNREGISTERED}}),
        "json with spaces": json.dumps(_secret({"k": UNREGISTERED}), indent=2),
        "yaml": f"kind: Secret\ndata:\n  k: {UNREGISTERED}\n  cert: |\n    {value}\nmetadata:\n  name: a\n",
        "stringData with braces": json.dumps({"kind": "Secret", "stringData": {"k": f"{{{value}}}"}}),
    }[shape]
    scrubbed = redact_secret_objects(text)
    assert UNREGISTERED not in scrubbed and value not in scrubbed and "[REDACTED]" in scrubbed


def test_data_of_other_kinds_is_kept() -> None:
    text = json.dumps({"kind": "ConfigMap", "data": {"team.asc": "public key"}})
    assert redact_secret_objects(text) == text


def test_installed_redactor_scrubs_for_handlers_added_later_and_on_other_loggers(installed: None) -> None:
    """kopf's Event poster is a handler of ``kopf.objects``, not of the root logger; handlers can be added
    after install (kopf.configure): every one of them sees only scrubbed records."""
    install_redactor()
    REDACTOR.register("installed-secret-4711")
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    logger = logging.getLogger("test.redactor.poster")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = Collect()
    logger.addHandler(handler)  # after install_redactor, on a non-root logger
    try:
        logger.info("token %s", "installed-secret-4711")
        logger.debug("response body: %s", json.dumps(_secret({"k": UNREGISTERED})).encode())
    finally:
        logger.removeHandler(handler)
    assert seen and not any("installed-secret-4711" in line or UNREGISTERED in line for line in seen)


def test_verbose_keeps_our_debug_and_kopf_but_not_the_wire_loggers(installed: None) -> None:
    kopf.configure(verbose=True)
    install_redactor()
    assert logging.getLogger("runbook_operator.reconcilers.backup").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("kopf.objects").isEnabledFor(logging.DEBUG)
    for name in ("kubernetes.client.rest", "urllib3.connectionpool", "botocore.endpoint", "botocore.auth", "boto3"):
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name  # (the kubernetes client may
        # itself hold urllib3 at WARNING: above INFO is as safe)


def test_arguments_that_do_not_fit_never_raise_in_the_caller(installed: None) -> None:
    install_redactor()
    logging.getLogger("test.redactor").warning("two %s %s", "one")  # noqa: PLE1206 - raises nothing


def test_a_form_inside_a_longer_one_and_a_whole_private_key_are_replaced_whole() -> None:
    """The pattern is a trie of every form: the longest form at a position wins, a value that shares a prefix
    with another is still found, and a multi-kilobyte key (one literal, not a 3,000-deep nesting) compiles."""
    redactor = SecretRedactor()
    key = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(f"{i:02d}" + "Q" * 62 for i in range(40)) + "\n-----END-----\n"
    for value in ("abcdef-secret", "abcdef-secret-longer", "abcdef-other", key):
        redactor.register(value)
    text = "a abcdef-secret-longer b abcdef-secret c abcdef-other d abcdef-secre e"
    assert redactor.scrub(text) == "a [REDACTED] b [REDACTED] c [REDACTED] d abcdef-secre e"
    assert redactor.scrub(f"<{key}>") == "<[REDACTED]>"
    assert redactor.scrub("line " + key.splitlines()[7]) == "line [REDACTED]"


def test_registering_again_changes_nothing_and_a_new_value_is_scrubbed_at_once() -> None:
    redactor = SecretRedactor()
    redactor.register("first-secret-1")
    generation = redactor.generation
    redactor.register("first-secret-1")
    assert redactor.generation == generation
    redactor.register("second-secret-2")
    assert redactor.generation == generation + 1
    assert redactor.scrub("first-secret-1 second-secret-2") == "[REDACTED] [REDACTED]"
