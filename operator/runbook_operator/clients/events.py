"""Kubernetes Events that repeat by counting, as kubelet's event correlator does.

kopf posts a new Event object each time; a failure retried every 10 s would then add about 360 Events an
hour. Here an Event is named after what it says (the object, type, reason and message), so a repetition
updates that Event's ``count`` and ``lastTimestamp`` instead of adding one; a new message is a new Event.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ..conditions import now_rfc3339
from ..logs import REDACTOR
from . import kube

COMPONENT = "runbook-operator"
_REMEMBERED = 4096  # counts of the most recent Events; an older one is read back before it is counted
_COUNTS: OrderedDict[str, int] = OrderedDict()
_LOCK = threading.Lock()


def event_name(involved: Mapping[str, Any], type: str, reason: str, message: str) -> str:
    """The same object, type, reason and message always name the same Event."""
    metadata = involved["metadata"]
    digest = hashlib.sha256("\0".join((metadata.get("uid", ""), type, reason, message)).encode()).hexdigest()
    return f"{metadata['name'][:200]}.{digest[:16]}"


def _remember(name: str, count: int) -> None:
    with _LOCK:
        _COUNTS[name] = count
        _COUNTS.move_to_end(name)
        while len(_COUNTS) > _REMEMBERED:
            _COUNTS.popitem(last=False)


def post(api: kube.Api, involved: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
    """Post (or count once more) the Event about ``involved``; ``type`` is Normal or Warning. The message is
    scrubbed of every registered secret first."""
    message = REDACTOR.scrub(message)[:1024]
    metadata = involved["metadata"]
    namespace = metadata["namespace"]
    name = event_name(involved, type, reason, message)
    now = now_rfc3339()
    with _LOCK:
        count = _COUNTS.get(name)
    if count is None:
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": metadata["name"],
                "namespace": namespace,
                "uid": metadata.get("uid"),
            },
            "type": type,
            "reason": reason,
            "message": message,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
        }
        if api.create(kube.EVENTS, namespace, event):
            _remember(name, 1)
            return
        posted = api.get(kube.EVENTS, namespace, name)  # posted before a restart
        count = int((posted or {}).get("count") or 1)
    if api.patch(kube.EVENTS, namespace, name, {"count": count + 1, "lastTimestamp": now}) is None:
        with _LOCK:
            _COUNTS.pop(name, None)  # expired (the API server keeps Events for an hour): post it anew
        post(api, involved, type=type, reason=reason, message=message)
        return
    _remember(name, count + 1)
