"""An in-memory ``clients.kube.Api`` for fast specification tests of reconciler decisions.

It keeps objects as the API server would return them (resourceVersion, uid, generation, creationTimestamp),
applies JSON merge patches and server-side applies (as a merge, which is what the operator's own field
manager amounts to here), records every call in ``calls`` and fails chosen calls on demand (``fail_on``)
to simulate a refusal or a crash between two steps. The integration tests keep the real API server.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiException

from runbook_operator.clients.kube import LOG_CHUNK, PODS, Resource

WRITES = frozenset({"create", "apply", "patch", "delete"})


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class Call:
    verb: str
    plural: str
    namespace: str
    name: str | None
    subresource: str | None = None
    body: Any = None


@dataclass
class FakeApi:
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    logs: dict[tuple[str, str], str] = field(default_factory=dict)
    failures: list[tuple[str, str, int, int]] = field(default_factory=list)  # verb, plural, status, remaining
    _versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # --- test helpers ---
    def put(self, resource: Resource, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Store an object as if someone else had created it."""
        stored = copy.deepcopy(dict(body))
        stored.setdefault("apiVersion", resource.api_version)
        stored.setdefault("kind", resource.kind)
        metadata = stored.setdefault("metadata", {})
        metadata["namespace"] = namespace
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("generation", 1)
        metadata.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        metadata["resourceVersion"] = str(next(self._versions))
        self.objects[(resource.plural, namespace, metadata["name"])] = stored
        return copy.deepcopy(stored)

    def stored(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((resource.plural, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def fail_on(self, verb: str, plural: str, *, status: int = 403, times: int = 1) -> None:
        """The next ``times`` calls of ``verb`` on ``plural`` fail with HTTP ``status``."""
        self.failures.append((verb, plural, status, times))

    def writes(self) -> list[Call]:
        return [c for c in self.calls if c.verb in WRITES]

    def _record(self, call: Call) -> None:
        self.calls.append(call)
        for index, (verb, plural, status, remaining) in enumerate(self.failures):
            if verb == call.verb and plural == call.plural and remaining > 0:
                self.failures[index] = (verb, plural, status, remaining - 1)
                raise ApiException(status=status, reason="Injected")

    # --- Api ---
    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        self._record(Call("get", resource.plural, namespace, name))
        return self.stored(resource, namespace, name)

    def list(self, resource: Resource, namespace: str | None, *, labels: str | None = None) -> list[dict[str, Any]]:
        self._record(Call("list", resource.plural, namespace or "", None, body=labels))
        wanted = dict(part.split("=", 1) for part in labels.split(",")) if labels else {}
        found = []
        for (plural, ns, _), body in sorted(self.objects.items()):
            object_labels = body["metadata"].get("labels") or {}
            matches = all(object_labels.get(k) == v for k, v in wanted.items())
            if plural == resource.plural and namespace in (None, ns) and matches:
                found.append(copy.deepcopy(body))
        return found

    def create(self, resource: Resource, namespace: str, body: Mapping[str, Any]) -> bool:
        self._record(Call("create", resource.plural, namespace, body["metadata"]["name"], body=body))
        if (resource.plural, namespace, body["metadata"]["name"]) in self.objects:
            return False
        self.put(resource, namespace, body)
        return True

    def apply(self, resource: Resource, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        self._record(Call("apply", resource.plural, namespace, name, body=body))
        current = self.objects.get((resource.plural, namespace, name))
        if current is None:
            return self.put(resource, namespace, body)
        merged = merge_patch(current, body)
        merged["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[(resource.plural, namespace, name)] = merged
        return copy.deepcopy(merged)

    def patch(
        self, resource: Resource, namespace: str, name: str, patch: Mapping[str, Any], *, subresource: str | None = None
    ) -> dict[str, Any] | None:
        self._record(Call("patch", resource.plural, namespace, name, subresource, body=patch))
        current = self.objects.get((resource.plural, namespace, name))
        if current is None:
            return None
        if subresource == "scale":
            patch = {"spec": {"replicas": patch["spec"]["replicas"]}}
        elif subresource == "status":
            patch = {"status": patch.get("status")}
        else:
            patch = {k: v for k, v in patch.items() if k != "status"}
        merged = merge_patch(current, patch)
        merged["metadata"]["resourceVersion"] = str(next(self._versions))
        if subresource is None and "spec" in patch:
            merged["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
        self.objects[(resource.plural, namespace, name)] = merged
        return copy.deepcopy(merged)

    def delete(self, resource: Resource, namespace: str, name: str) -> bool:
        self._record(Call("delete", resource.plural, namespace, name))
        return self.objects.pop((resource.plural, namespace, name), None) is not None

    def stream_log(
        self,
        namespace: str,
        pod: str,
        *,
        container: str,
        limit_bytes: int,
        previous: bool = False,
        timestamps: bool = False,
        timeout: float | None = None,
    ) -> Iterator[bytes]:
        """The pod's log from ``logs`` (the same for every container and run; none: empty), its first
        ``limit_bytes``, in chunks of LOG_CHUNK."""
        self._record(Call("get", PODS.plural, namespace, pod, "log"))
        data = self.logs.get((namespace, pod), "").encode()[:limit_bytes]
        for start in range(0, len(data), LOG_CHUNK):
            yield data[start : start + LOG_CHUNK]
