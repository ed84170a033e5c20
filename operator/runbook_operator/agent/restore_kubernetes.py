"""A Kubernetes export's restore: one ``# namespace: NAME`` section re-applied, by server-side apply.

``verify_kubernetes`` (the preflight's verify Job: ``runbook-operator verify --source kubernetes``) streams
the stored object ``S3 -> gpg`` and keeps nothing: size and SHA-256 must match the manifest, gpg must decrypt
it completely, and the chosen section must be there with objects that parse. ``restore_kubernetes``
(``runbook-operator restore-kubernetes``, in the restore Job's pod) streams it again, keeps only the chosen
section's objects (a namespace's configuration, not data), and applies nothing until the whole object
matched its SHA-256. Each object is then server-side applied (field manager ``runbook-restore``) first as
the API server's dry run (``dryRun=All``), which says what the apply would make of it:

- not there: ``created``;
- there and the dry run's result equals it: ``unchanged`` (no write at all);
- there and different: ``skipped`` (``conflicts: Skip``, reported, not touched) or ``replaced``
  (``conflicts: Replace``, applied with ``force``: the backed-up fields win, fields it lacks stay).

With ``dryRun`` nothing but the dry runs is sent. Secrets are applied only with ``includeSecrets``, else
counted as left out. The summary names objects only (``Kind/name``), never their data: a Secret's values
never leave the API server's requests.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import yaml
from kubernetes.client import ApiException

from ..clients import kube
from ..errors import RunbookError
from ..logs import REDACTOR
from ..models.backup import KUBERNETES_RESOURCES
from ..models.plans import RESTORE_PLAN_ENV, KubernetesRestorePlan
from .backup import one_line
from .restore import SECRET_ENVS, read_plan, report, stream

FIELD_MANAGER = "runbook-restore"
SECTION_MARKER = "# namespace: "
APPLY = "application/apply-patch+yaml"
# The kubelet keeps at most 4096 bytes of a termination message: the summary is shortened to fit.
_SUMMARY_LIMIT = 3500
_OUTCOMES = ("created", "replaced", "skipped", "unchanged", "failed")
# (group, version, kind) -> plural, for the closed list of exportable resources.
_PLURALS = {(group, version, kind): plural for plural, (group, version, kind) in KUBERNETES_RESOURCES.items()}
# What an apply changes on an object that is otherwise as it was: who manages which field, and its version.
_BOOKKEEPING = ("managedFields", "resourceVersion")


class SectionSink:
    """The plaintext export, line by line: the documents of one section are parsed (and kept when ``keep``);
    the rest is dropped as it passes, so only one document is ever held unless asked to keep them."""

    def __init__(self, section: str, *, keep: bool) -> None:
        self.section = section
        self.keep = keep
        self.found = False
        self.count = 0
        self.objects: list[dict[str, Any]] = []
        self.error: str | None = None
        self._current: str | None = None
        self._partial = b""
        self._document: list[str] = []

    def _end_document(self) -> None:
        text = "".join(self._document)
        self._document = []
        if self._current != self.section or not text.strip():
            return
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as error:
            self.error = (
                self.error or f"object {self.count + 1} of section {self.section} is not YAML ({type(error).__name__})"
            )
            return
        if not isinstance(obj, dict) or not obj.get("kind") or not (obj.get("metadata") or {}).get("name"):
            self.error = self.error or f"object {self.count + 1} of section {self.section} has no kind or name"
            return
        self.count += 1
        if self.keep:
            self.objects.append(obj)

    def _line(self, line: str) -> None:
        if line.startswith(SECTION_MARKER):
            self._end_document()
            self._current = line[len(SECTION_MARKER) :].strip()
            self.found = self.found or self._current == self.section
        elif line.rstrip("\n") == "---":
            self._end_document()
        elif self._current == self.section:
            self._document.append(line)

    def write(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._line(raw.decode(errors="replace") + "\n")

    def finish(self) -> int:
        if self._partial:
            self._line(self._partial.decode(errors="replace"))
            self._partial = b""
        self._end_document()
        return 0

    def kill(self) -> None:
        self._document = []
        self.objects = []


def read_section(plan: KubernetesRestorePlan, env: Mapping[str, str], *, keep: bool) -> tuple[SectionSink, str]:
    """The stored export streamed through gpg; the section's objects only once everything checked out, and the
    object's ETag."""
    sink = SectionSink(plan.section, keep=keep)
    streamed = stream(plan, env, sink)
    if not sink.found:
        raise RunbookError(
            "SectionNotFound", f"spec.kubernetes.namespace: {plan.key} has no section for namespace {plan.section}"
        )
    if sink.error is not None:
        raise RunbookError("ArchiveUnreadable", f"{plan.key}: {sink.error}")
    return sink, streamed.etag


def verify_kubernetes(plan: KubernetesRestorePlan, env: Mapping[str, str]) -> dict[str, Any]:
    """The preflight: checksum, decryption and the section's objects; returns the figures."""
    sink, etag = read_section(plan, env, keep=False)
    return {"sha256": plan.sha256, "sizeBytes": plan.size_bytes, "etag": etag, "archiveEntries": sink.count}


def identity(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def object_path(obj: Mapping[str, Any], namespace: str) -> str:
    """The object's URL in ``namespace``; only the exportable resources (a closed list) are restorable."""
    group, _, version = str(obj.get("apiVersion") or "").rpartition("/")
    plural = _PLURALS.get((group, version, str(obj.get("kind"))))
    if plural is None:
        raise RunbookError("NotRestorable", f"{identity(obj)}: {obj.get('apiVersion')} is not an exportable resource")
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    return f"{base}/namespaces/{namespace}/{plural}/{obj['metadata']['name']}"


def _comparable(obj: Mapping[str, Any]) -> dict[str, Any]:
    metadata = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in _BOOKKEEPING}
    return {**obj, "metadata": metadata}


class Applier:
    """Server-side apply of one namespace's objects through the shared API client."""

    def __init__(self, namespace: str) -> None:
        from ..clients.kube import api_client

        self.namespace = namespace
        self.client = api_client()

    def _call(self, method: str, path: str, *, body: Any = None, query: list[tuple[str, Any]] | None = None) -> Any:
        headers = {"Content-Type": APPLY, "Accept": "application/json"} if body is not None else None
        return self.client.call_api(
            path,
            method,
            query_params=query or [],
            header_params=headers,
            body=body,
            response_types_map={200: "object", 201: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
        )

    def current(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self._call("GET", object_path(obj, self.namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def apply(self, obj: Mapping[str, Any], *, dry_run: bool) -> dict[str, Any]:
        desired = {**obj, "metadata": {**obj["metadata"], "namespace": self.namespace}}
        query: list[tuple[str, Any]] = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        if dry_run:
            query.append(("dryRun", "All"))
        applied: dict[str, Any] = self._call("PATCH", object_path(obj, self.namespace), body=desired, query=query)
        return applied


def _refusal(obj: Mapping[str, Any], error: BaseException) -> str:
    """Why the API server refused an object: its status and reason; the message too, except for Secrets (an
    invalid Secret's message may quote its data)."""
    if isinstance(error, RunbookError):
        return f"{identity(obj)}: {error.reason}"
    if not isinstance(error, ApiException):
        return f"{identity(obj)}: {type(error).__name__}"
    reason, message = kube.server_status(error)
    if obj.get("kind") == "Secret" or message == reason:
        return f"{identity(obj)}: HTTP {error.status} {reason}"
    return f"{identity(obj)}: HTTP {error.status} {reason}: {one_line(REDACTOR.scrub(message), 200)}"


def apply_section(plan: KubernetesRestorePlan, objects: list[dict[str, Any]], applier: Applier) -> dict[str, Any]:
    """Each object dry-run applied, then applied as the outcome and ``conflicts`` say; the summary."""
    outcomes: dict[str, list[str]] = {name: [] for name in _OUTCOMES}
    secrets_left_out = 0
    for obj in objects:
        if obj.get("kind") == "Secret" and not plan.include_secrets:
            secrets_left_out += 1
            continue
        name = identity(obj)
        try:
            current = applier.current(obj)
            would_be = applier.apply(obj, dry_run=True)
            if current is None:
                outcome = "created"
            elif _comparable(would_be) == _comparable(current):
                outcome = "unchanged"
            else:
                outcome = "replaced" if plan.conflicts == "Replace" else "skipped"
            if outcome in ("created", "replaced") and not plan.dry_run:
                applier.apply(obj, dry_run=False)
        except (ApiException, RunbookError) as error:
            outcomes["failed"].append(_refusal(obj, error))
            continue
        outcomes[outcome].append(name)
    return {
        "section": plan.section,
        "namespace": plan.namespace,
        "dryRun": plan.dry_run,
        "conflicts": plan.conflicts,
        "objects": len(objects),
        "counts": {name: len(names) for name, names in outcomes.items()},
        **outcomes,
        "secretsLeftOut": secrets_left_out,
    }


def fitted(summary: dict[str, Any], limit: int = _SUMMARY_LIMIT) -> dict[str, Any]:
    """The summary within ``limit`` bytes of JSON: name lists shortened (``truncated``), counts kept."""
    keep = max((len(summary[name]) for name in _OUTCOMES), default=0)
    shortened = dict(summary)
    while len(json.dumps(shortened)) > limit and keep > 0:
        keep //= 2
        shortened = {**summary, **{name: summary[name][:keep] for name in _OUTCOMES}, "truncated": True}
    return shortened


def restore_kubernetes(plan: KubernetesRestorePlan, env: Mapping[str, str]) -> dict[str, Any]:
    """Read the section (whole object verified first), then apply it; the summary."""
    sink, _ = read_section(plan, env, keep=True)
    return fitted(apply_section(plan, sink.objects, Applier(plan.namespace)))


def main(*, env: Mapping[str, str] | None = None) -> int:
    """``runbook-operator restore-kubernetes``: exit 0 with a one-line JSON summary (also the termination
    message), or 1 with ``restore failed: <Reason>: <message>`` as the last line of stderr."""
    environment = os.environ if env is None else env
    for name in SECRET_ENVS:
        REDACTOR.register(environment.get(name))
    try:
        plan = read_plan(environment, RESTORE_PLAN_ENV, KubernetesRestorePlan)
        summary = restore_kubernetes(plan, environment)
    except RunbookError as error:
        print(f"restore failed: {error.reason}: {REDACTOR.scrub(error.message)}", file=sys.stderr, flush=True)
        return 1
    line = json.dumps({"restore": "complete", "kubernetes": summary}, separators=(",", ":"))
    report(line)
    print(line, flush=True)
    return 0
