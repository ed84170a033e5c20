"""Any failure as the user sees it (reconcilers/runtime.py ``as_failure``) and the retry schedule."""

from __future__ import annotations

import json

from kubernetes.client import ApiException

from runbook_operator.clients.kube import server_message, server_status
from runbook_operator.errors import RunbookError
from runbook_operator.logs import REDACTOR
from runbook_operator.reconcilers.runtime import MAX_BACKOFF, UNEXPECTED_RETRY, as_failure, backoff


def api_error(status: int, message: str) -> ApiException:
    error = ApiException(status=status, reason="Forbidden")
    error.body = json.dumps({"kind": "Status", "message": message})
    return error


def test_an_api_refusal_says_what_the_api_server_said() -> None:
    said = 'cronjobs.batch "backup-db" is forbidden: User "system:serviceaccount:x:y" cannot create resource'
    error = as_failure(api_error(403, said))
    assert error.reason == "Forbidden"
    assert error.message == f"Kubernetes API: HTTP 403: {said}"
    assert error.retry_after == UNEXPECTED_RETRY


def test_a_runbook_error_is_kept_and_anything_else_is_named_by_type() -> None:
    mine = RunbookError("SecretNotFound", "spec.x: Secret y not found", retry_after=30)
    assert as_failure(mine) is mine
    error = as_failure(KeyError("status"))
    assert (error.reason, error.message) == ("InternalError", "KeyError: 'status'")
    assert as_failure(api_error(500, "etcdserver: request timed out")).reason == "APIError"


def test_no_registered_secret_reaches_the_message() -> None:
    REDACTOR.register("hunter2-the-password")
    error = as_failure(ValueError("login failed for hunter2-the-password\nmore"))
    assert "hunter2" not in error.message and error.message.startswith("ValueError: ")


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(10, n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff(10, 50) == MAX_BACKOFF


def test_the_api_servers_message_is_read_from_a_status_plain_text_or_nothing() -> None:
    def refusal(status: int, reason: str, body: str | bytes | None) -> ApiException:
        error = ApiException(status=status, reason=reason)
        error.body = body
        return error

    status = '{"kind":"Status","reason":"Forbidden","message":"secrets \\"x\\" is forbidden: User \\"u\\""}'
    assert server_status(refusal(403, "Forbidden", status)) == ("Forbidden", 'secrets "x" is forbidden: User "u"')
    assert server_status(refusal(403, "Forbidden", status.encode())) == server_status(refusal(403, "F", status))
    assert (
        server_message(refusal(502, "Bad Gateway", "kubelet: container not found\n")) == "kubelet: container not found"
    )
    assert server_status(refusal(500, "Internal Server Error", None)) == (
        "Internal Server Error",
        "Internal Server Error",
    )
    assert server_message(refusal(422, "Unprocessable Entity", '{"kind":"Status"}')) == "Unprocessable Entity"
    assert server_message(refusal(400, "Bad Request", "[1, 2]")) == "[1, 2]"
